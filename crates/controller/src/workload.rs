//! The objects that run an admitted container: its Pod and the local PersistentVolumes (with
//! their claims) that bring the home, a storage container's distro trees, or the custom distro
//! it runs on. Pure builders.
//!
//! Homes reach the Pod as pre-bound local PersistentVolumes rather than hostPath volumes, so
//! customer namespaces can enforce the `restricted` Pod Security Standard: only the agent
//! touches host paths.
//!
//! A container on a custom distro runs with the distro as its root filesystem and still meets
//! `restricted`: its image is an empty one (mount points only), and each top-level directory of
//! the distro is mounted at `/<name>` as a `subPath` of the distro's volume. The kubelet resolves
//! a subPath by opening each component without following symlinks out of the volume and mounts
//! what it opened (its fix of CVE-2017-1002101), so a symlink the customer plants in the tree
//! fails that Pod's start instead of bringing a host path into it. No chroot, so no root start,
//! no capability: the Emperor runs as the container's uid from the first instruction, and the
//! distro's files are read-only to it because they are the storage container's (another uid),
//! except directories the customer made world-writable, as on uwsgi.it.

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::api::core::v1::{
    Capabilities, Container as PodContainer, EmptyDirVolumeSource, EnvVar, LocalVolumeSource,
    NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, ObjectReference, PersistentVolume,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource,
    PersistentVolumeSpec, Pod, PodSecurityContext, PodSpec, ResourceRequirements, SeccompProfile,
    SecurityContext, Volume, VolumeMount, VolumeNodeAffinity, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};
use uwsgi_it_api::Container;
use uwsgi_it_domain::distro::RunnableRoot;

/// Label on every object the operator creates.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "uwsgi-it-operator");
/// Label naming the Container a Pod or claim belongs to.
pub const CONTAINER_LABEL: &str = "uwsgi.it/container";
/// Annotation holding the hash of everything whose change needs a new Pod.
pub const SPEC_HASH_ANNOTATION: &str = "uwsgi.it/spec-hash";
/// Annotation of a Pod started for a restart request: the Container's `spec.restartedAt`.
pub const RESTARTED_AT_ANNOTATION: &str = "uwsgi.it/restarted-at";
/// Storage class of the operator's pre-bound local volumes (no provisioner).
pub const STORAGE_CLASS: &str = "uwsgi-it-local";

/// Everything needed to build a container's workload.
#[derive(Debug, Clone)]
pub struct WorkloadInput<'a> {
    /// The Container.
    pub container: &'a Container,
    /// Its uid.
    pub uid: u32,
    /// The admitted memory in MB: the reservation, not the request, so a resize that was
    /// refused keeps the running Pod as it is.
    pub memory_mb: i64,
    /// Its server node.
    pub server: &'a str,
    /// The image: the platform distro's, or the operator's empty custom-distro image.
    pub image: &'a str,
    /// The home directory on the server.
    pub home: &'a Path,
    /// What the container runs on.
    pub root: Root<'a>,
    /// A storage container's distro trees on the server, mounted at `<home>/distros`.
    pub distro_trees: Option<&'a Path>,
    /// The restart request in force: `spec.restartedAt`, else the one the running Pod was
    /// started for (taking the field out of the spec asks for nothing, so restarts nothing).
    pub restarted_at: Option<&'a str>,
}

/// The root filesystem of a container.
#[derive(Debug, Clone, Copy)]
pub enum Root<'a> {
    /// The image's own (a platform distro).
    Image,
    /// A custom distro's tree on the server, with the agent's checked survey of it.
    CustomDistro {
        /// `<homeRoot>/.distros/<storage uid>/<path>`.
        tree: &'a Path,
        /// Its directories and its Emperor.
        root: &'a RunnableRoot,
    },
}

/// The objects of one container's workload.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    /// Volumes with the claims bound to them: the home, then the distro trees of a storage
    /// container or the custom distro a container runs on.
    pub volumes: Vec<(PersistentVolume, PersistentVolumeClaim)>,
    /// The Pod.
    pub pod: Pod,
}

/// Where every platform distro has its uWSGI (the seed's distro checklist).
pub const EMPEROR_BINARY: &str = "/opt/unbit/uwsgi/uwsgi";

/// The Emperor's command line: it watches `<home>/vassals` and starts (and stops) one vassal per
/// `.ini` the customer puts (or removes) there, as on uwsgi.it. `--die-on-term`: the kubelet
/// stops a Pod with SIGTERM, which a plain uWSGI would take as "reload".
pub fn emperor_args(home: &str) -> Vec<String> {
    vec![
        "--emperor".into(),
        format!("{home}/vassals"),
        "--die-on-term".into(),
    ]
}

/// Where the home is mounted inside the Pod: `/containers/<uid>`, as on uwsgi.it.
pub fn home_mount_path(uid: u32) -> String {
    format!("/containers/{uid}")
}

/// The `PATH` of a container on a custom distro (its image, being empty, sets none).
pub const CUSTOM_DISTRO_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Name of the Pod volume holding the custom distro; its mounts are left out of the spec hash.
const DISTRO_VOLUME: &str = "distro";

/// Names of a custom distro's volume and claim. A PersistentVolume's path cannot change, so the
/// names carry a hash of the tree's path: another distro (or the same one at another path) is
/// another volume, and the old one is deleted once no Pod uses it.
pub fn custom_distro_volume_names(uid: u32, container: &str, tree: &Path) -> (String, String) {
    let hash = &fnv1a(tree.as_os_str().as_encoded_bytes())[..10];
    (
        format!("uwsgi-it-distro-{uid}-{hash}"),
        format!("{container}-distro-{hash}"),
    )
}

/// Builds the workload of an admitted container.
pub fn build(input: &WorkloadInput<'_>) -> Workload {
    let container = input.container;
    let name = container.name_any();
    let namespace = container.namespace().unwrap_or_default();
    let owner = container.controller_owner_ref(&());
    let labels = BTreeMap::from([
        (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
        (CONTAINER_LABEL.to_string(), name.clone()),
    ]);
    let storage = Quantity(format!("{}Mi", container.spec.storage.max(1)));

    let mut volumes = vec![local_volume(
        &format!("uwsgi-it-home-{}", input.uid),
        &format!("{name}-home"),
        &namespace,
        input.home,
        input.server,
        storage.clone(),
        &labels,
        &owner,
    )];
    let home_path = home_mount_path(input.uid);
    let memory = Quantity(format!("{}Mi", input.memory_mb.max(1)));
    let mut mounts = Vec::new();
    let mut pod_volumes = vec![claim_volume("home", &volumes[0].1)];
    let mut env_vars = vec![
        env("HOME", &home_path),
        env("UWSGI_IT_UID", &input.uid.to_string()),
    ];
    let emperor = match input.root {
        Root::Image => EMPEROR_BINARY.to_string(),
        Root::CustomDistro { tree, root } => {
            let (volume_name, claim_name) = custom_distro_volume_names(input.uid, &name, tree);
            volumes.push(local_volume(
                &volume_name,
                &claim_name,
                &namespace,
                tree,
                input.server,
                Quantity("1Mi".into()),
                &labels,
                &owner,
            ));
            pod_volumes.push(claim_volume(DISTRO_VOLUME, &volumes[1].1));
            mounts.extend(root.directories.iter().map(|directory| VolumeMount {
                name: DISTRO_VOLUME.into(),
                mount_path: format!("/{directory}"),
                sub_path: Some(directory.clone()),
                ..VolumeMount::default()
            }));
            for scratch in ["tmp", "run"] {
                pod_volumes.push(Volume {
                    name: scratch.into(),
                    empty_dir: Some(EmptyDirVolumeSource::default()),
                    ..Volume::default()
                });
                mounts.push(VolumeMount {
                    name: scratch.into(),
                    mount_path: format!("/{scratch}"),
                    ..VolumeMount::default()
                });
            }
            env_vars.push(env("PATH", CUSTOM_DISTRO_PATH));
            root.emperor.clone()
        }
    };
    // After the distro's mounts: the home is a mount inside the container's /containers.
    mounts.push(VolumeMount {
        name: "home".into(),
        mount_path: home_path.clone(),
        ..VolumeMount::default()
    });
    if let Some(trees) = input.distro_trees {
        volumes.push(local_volume(
            &format!("uwsgi-it-distros-{}", input.uid),
            &format!("{name}-distros"),
            &namespace,
            trees,
            input.server,
            Quantity("1Mi".into()),
            &labels,
            &owner,
        ));
        pod_volumes.push(claim_volume("distros", &volumes[volumes.len() - 1].1));
        // Inside the home's mount: the runtime resolves the mount point within the container's
        // own root, so whatever the customer put at <home>/distros only affects its own view.
        mounts.push(VolumeMount {
            name: "distros".into(),
            mount_path: format!("{home_path}/distros"),
            ..VolumeMount::default()
        });
    }
    let custom_root = matches!(input.root, Root::CustomDistro { .. });
    let uid = i64::from(input.uid);
    let spec = PodSpec {
        node_name: Some(input.server.to_string()),
        restart_policy: Some("Always".into()),
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        security_context: Some(PodSecurityContext {
            run_as_user: Some(uid),
            run_as_group: Some(uid),
            run_as_non_root: Some(true),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..SeccompProfile::default()
            }),
            ..PodSecurityContext::default()
        }),
        containers: vec![PodContainer {
            name: "main".into(),
            image: Some(input.image.to_string()),
            command: Some(vec![emperor]),
            args: Some(emperor_args(&home_path)),
            working_dir: Some(home_path.clone()),
            env: Some(env_vars),
            resources: Some(ResourceRequirements {
                requests: Some(BTreeMap::from([("memory".to_string(), memory.clone())])),
                limits: Some(BTreeMap::from([("memory".to_string(), memory)])),
                ..ResourceRequirements::default()
            }),
            security_context: Some(SecurityContext {
                allow_privilege_escalation: Some(false),
                run_as_non_root: Some(true),
                // The empty image has nothing to write: everything writable is a volume.
                read_only_root_filesystem: custom_root.then_some(true),
                capabilities: Some(Capabilities {
                    drop: Some(vec!["ALL".into()]),
                    ..Capabilities::default()
                }),
                ..SecurityContext::default()
            }),
            volume_mounts: Some(mounts),
            ..PodContainer::default()
        }],
        volumes: Some(pod_volumes),
        ..PodSpec::default()
    };
    let mut hash = spec_hash(&restart_relevant(&spec));
    let mut annotations = BTreeMap::new();
    // A restart the customer asked for: each new value is another hash, so one new Pod. Without
    // a value the hash is the spec's alone (an upgrade restarts nothing).
    if let Some(requested) = input.restarted_at {
        hash = fnv1a(format!("{hash}\nrestartedAt={requested}").as_bytes());
        annotations.insert(RESTARTED_AT_ANNOTATION.to_string(), requested.to_string());
    }
    annotations.insert(SPEC_HASH_ANNOTATION.to_string(), hash);
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(namespace),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: owner.map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: Some(spec),
        status: None,
    };
    Workload { volumes, pod }
}

#[allow(clippy::too_many_arguments)]
fn local_volume(
    volume_name: &str,
    claim_name: &str,
    namespace: &str,
    path: &Path,
    server: &str,
    capacity: Quantity,
    labels: &BTreeMap<String, String>,
    owner: &Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>,
) -> (PersistentVolume, PersistentVolumeClaim) {
    let volume = PersistentVolume {
        metadata: ObjectMeta {
            name: Some(volume_name.to_string()),
            labels: Some(labels.clone()),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeSpec {
            capacity: Some(BTreeMap::from([("storage".to_string(), capacity.clone())])),
            access_modes: Some(vec![ACCESS_MODE.to_string()]),
            // The data is the customer's: deleting the volume object never deletes the home;
            // the agent archives it according to homeRetention.
            persistent_volume_reclaim_policy: Some("Retain".into()),
            storage_class_name: Some(STORAGE_CLASS.into()),
            local: Some(LocalVolumeSource {
                path: path.display().to_string(),
                ..LocalVolumeSource::default()
            }),
            node_affinity: Some(VolumeNodeAffinity {
                required: Some(NodeSelector {
                    node_selector_terms: vec![NodeSelectorTerm {
                        match_fields: Some(vec![NodeSelectorRequirement {
                            key: "metadata.name".into(),
                            operator: "In".into(),
                            values: Some(vec![server.to_string()]),
                        }]),
                        ..NodeSelectorTerm::default()
                    }],
                }),
            }),
            // Pre-bound: no other claim can take this volume.
            claim_ref: Some(ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("PersistentVolumeClaim".into()),
                namespace: Some(namespace.to_string()),
                name: Some(claim_name.to_string()),
                ..ObjectReference::default()
            }),
            ..PersistentVolumeSpec::default()
        }),
        status: None,
    };
    let claim = PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(claim_name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(labels.clone()),
            owner_references: owner.clone().map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec![ACCESS_MODE.to_string()]),
            storage_class_name: Some(STORAGE_CLASS.into()),
            volume_name: Some(volume_name.to_string()),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".to_string(), capacity)])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        status: None,
    };
    (volume, claim)
}

/// Every volume is one claim's on one node: a local volume is not shared across nodes, and each
/// container that runs on a distro has a volume (and claim) of its own for it.
const ACCESS_MODE: &str = "ReadWriteOnce";

fn claim_volume(name: &str, claim: &PersistentVolumeClaim) -> Volume {
    Volume {
        name: name.to_string(),
        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
            claim_name: claim.name_any(),
            read_only: Some(false),
        }),
        ..Volume::default()
    }
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: Some(value.to_string()),
        ..EnvVar::default()
    }
}

/// A stable hash (FNV-1a, 64 bit) of the Pod spec: equal specs give equal hashes across
/// controller versions, so an upgrade alone restarts nothing.
pub fn spec_hash(spec: &PodSpec) -> String {
    fnv1a(&serde_json::to_vec(spec).expect("a PodSpec serialises"))
}

/// The spec without what follows the custom distro's contents (its top-level directories, where
/// its uWSGI is): a customer filling its distro must not restart every container running on it.
/// Which distro, at which path, is still in the spec (the claim's name).
fn restart_relevant(spec: &PodSpec) -> PodSpec {
    let mut spec = spec.clone();
    if spec
        .volumes
        .iter()
        .flatten()
        .any(|v| v.name == DISTRO_VOLUME)
    {
        for container in &mut spec.containers {
            container.command = None;
            if let Some(mounts) = container.volume_mounts.as_mut() {
                mounts.retain(|m| m.name != DISTRO_VOLUME);
            }
        }
    }
    spec
}

fn fnv1a(bytes: &[u8]) -> String {
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::PathBuf;

    fn container(spec: serde_json::Value) -> Container {
        let mut c = Container::new("hydra", serde_json::from_value(spec).unwrap());
        c.metadata.namespace = Some("acme".into());
        c.metadata.uid = Some("3f1c".into());
        c
    }

    fn build_for(c: &Container, root: Root<'_>) -> Workload {
        let home = PathBuf::from("/containers/30001");
        build(&WorkloadInput {
            container: c,
            uid: 30001,
            memory_mb: c.spec.memory,
            server: "server-1",
            image: "debian:bookworm-slim",
            home: &home,
            root,
            distro_trees: None,
            restarted_at: c.spec.restarted_at.as_deref(),
        })
    }

    fn debian_root() -> RunnableRoot {
        RunnableRoot {
            directories: ["bin", "etc", "lib", "lib64", "opt", "usr", "var"]
                .map(String::from)
                .to_vec(),
            emperor: "/opt/unbit/uwsgi/uwsgi".into(),
        }
    }

    #[test]
    fn pod_is_pinned_unprivileged_and_sized() {
        let c = container(
            json!({"server": "203.0.113.10", "memory": 1000, "storage": 20000, "distro": "bookworm"}),
        );
        let workload = build_for(&c, Root::Image);
        let pod = serde_json::to_value(&workload.pod).unwrap();
        assert_eq!(pod["spec"]["nodeName"], "server-1");
        assert_eq!(pod["spec"]["securityContext"]["runAsUser"], 30001);
        assert_eq!(pod["spec"]["securityContext"]["runAsNonRoot"], true);
        assert_eq!(
            pod["spec"]["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        let main = &pod["spec"]["containers"][0];
        assert_eq!(main["image"], "debian:bookworm-slim");
        assert_eq!(main["command"], json!(["/opt/unbit/uwsgi/uwsgi"]));
        assert_eq!(main["args"][0], "--emperor");
        assert_eq!(main["args"][1], "/containers/30001/vassals");
        assert_eq!(main["resources"]["requests"]["memory"], "1000Mi");
        assert_eq!(main["resources"]["limits"]["memory"], "1000Mi");
        assert_eq!(main["securityContext"]["allowPrivilegeEscalation"], false);
        assert_eq!(
            main["securityContext"]["capabilities"]["drop"],
            json!(["ALL"])
        );
        assert_eq!(main["volumeMounts"][0]["mountPath"], "/containers/30001");
        assert_eq!(pod["metadata"]["ownerReferences"][0]["kind"], "Container");
        assert_eq!(pod["metadata"]["ownerReferences"][0]["controller"], true);
        assert!(
            pod["spec"]["volumes"][0]["hostPath"].is_null(),
            "no hostPath in customer pods"
        );
    }

    #[test]
    fn home_volume_is_local_pre_bound_retained_and_pinned() {
        let c = container(
            json!({"server": "server-1", "memory": 64, "storage": 20000, "distro": "bookworm"}),
        );
        let workload = build_for(&c, Root::Image);
        assert_eq!(workload.volumes.len(), 1);
        let (pv, pvc) = &workload.volumes[0];
        let pv = serde_json::to_value(pv).unwrap();
        let pvc = serde_json::to_value(pvc).unwrap();
        assert_eq!(pv["spec"]["local"]["path"], "/containers/30001");
        assert_eq!(pv["spec"]["persistentVolumeReclaimPolicy"], "Retain");
        assert_eq!(pv["spec"]["capacity"]["storage"], "20000Mi");
        assert_eq!(pv["spec"]["claimRef"]["name"], "hydra-home");
        assert_eq!(pv["spec"]["claimRef"]["namespace"], "acme");
        assert_eq!(
            pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchFields"][0]["values"],
            json!(["server-1"])
        );
        assert_eq!(pvc["spec"]["volumeName"], "uwsgi-it-home-30001");
        assert_eq!(pvc["spec"]["resources"]["requests"]["storage"], "20000Mi");
    }

    #[test]
    fn a_custom_distro_is_the_root_filesystem_mounted_by_subpath() {
        let c = container(
            json!({"server": "server-1", "memory": 64, "storage": 100, "customDistro": "ubuntu0001"}),
        );
        let tree = PathBuf::from("/containers/.distros/30002/ubuntu0001");
        let root = debian_root();
        let workload = build_for(
            &c,
            Root::CustomDistro {
                tree: &tree,
                root: &root,
            },
        );
        let pod = serde_json::to_value(&workload.pod).unwrap();
        let main = &pod["spec"]["containers"][0];
        assert_eq!(main["command"], json!(["/opt/unbit/uwsgi/uwsgi"]));
        let mounts = main["volumeMounts"].as_array().unwrap();
        for directory in &root.directories {
            let mount = mounts
                .iter()
                .find(|m| m["mountPath"] == format!("/{directory}"))
                .unwrap_or_else(|| panic!("/{directory} is mounted"));
            assert_eq!(mount["name"], "distro");
            assert_eq!(mount["subPath"], directory.as_str());
            assert!(
                mount["readOnly"].is_null(),
                "world-writable directories stay writable"
            );
        }
        for scratch in ["/tmp", "/run"] {
            let mount = mounts.iter().find(|m| m["mountPath"] == scratch).unwrap();
            assert_ne!(mount["name"], "distro", "{scratch} is the container's own");
        }
        assert_eq!(mounts.last().unwrap()["mountPath"], "/containers/30001");
        // Still Pod Security `restricted`: non-root from the start, no capability.
        assert_eq!(pod["spec"]["securityContext"]["runAsUser"], 30001);
        assert_eq!(
            main["securityContext"]["capabilities"]["drop"],
            json!(["ALL"])
        );
        assert_eq!(main["securityContext"]["allowPrivilegeEscalation"], false);
        assert_eq!(main["securityContext"]["readOnlyRootFilesystem"], true);
        let pv = serde_json::to_value(&workload.volumes[1].0).unwrap();
        assert_eq!(
            pv["spec"]["local"]["path"],
            "/containers/.distros/30002/ubuntu0001"
        );
        let (volume, claim) = custom_distro_volume_names(30001, "hydra", &tree);
        assert_eq!(pv["metadata"]["name"], volume.as_str());
        assert_eq!(
            pod["spec"]["volumes"][1]["persistentVolumeClaim"]["claimName"],
            claim.as_str()
        );
    }

    #[test]
    fn another_distro_path_is_another_volume_and_a_restart_but_its_contents_are_not() {
        let c = container(
            json!({"server": "server-1", "memory": 64, "storage": 100, "customDistro": "ubuntu0001"}),
        );
        let tree = PathBuf::from("/containers/.distros/30002/ubuntu0001");
        let moved = PathBuf::from("/containers/.distros/30002/ubuntu0002");
        let root = debian_root();
        let hash = |w: &Workload| {
            w.pod.metadata.annotations.as_ref().unwrap()[SPEC_HASH_ANNOTATION].clone()
        };
        let first = build_for(
            &c,
            Root::CustomDistro {
                tree: &tree,
                root: &root,
            },
        );
        let other = build_for(
            &c,
            Root::CustomDistro {
                tree: &moved,
                root: &root,
            },
        );
        assert_ne!(
            first.volumes[1].0.metadata.name,
            other.volumes[1].0.metadata.name
        );
        assert_ne!(hash(&first), hash(&other));
        let mut grown = debian_root();
        grown.directories.push("srv".into());
        grown.emperor = "/usr/bin/uwsgi".into();
        let refilled = build_for(
            &c,
            Root::CustomDistro {
                tree: &tree,
                root: &grown,
            },
        );
        assert_eq!(
            hash(&first),
            hash(&refilled),
            "filling the distro restarts nothing"
        );
    }

    #[test]
    fn each_new_restart_request_is_one_new_pod_and_none_is_the_plain_spec() {
        let plain =
            json!({"server": "server-1", "memory": 64, "storage": 100, "distro": "bookworm"});
        let with = |at: &str| {
            let mut spec = plain.clone();
            spec["restartedAt"] = json!(at);
            container(spec)
        };
        let hash = |w: &Workload| {
            w.pod.metadata.annotations.as_ref().unwrap()[SPEC_HASH_ANNOTATION].clone()
        };
        let before = build_for(&container(plain.clone()), Root::Image);
        let first = build_for(&with("2026-12-02T10:00:00Z"), Root::Image);
        let again = build_for(&with("2026-12-02T10:00:00Z"), Root::Image);
        let second = build_for(&with("2026-12-02T10:05:00Z"), Root::Image);
        assert_ne!(hash(&before), hash(&first), "a request restarts");
        assert_eq!(
            hash(&first),
            hash(&again),
            "the same request again restarts nothing"
        );
        assert_ne!(hash(&first), hash(&second), "a new request restarts again");
        assert_eq!(
            first.pod.metadata.annotations.as_ref().unwrap()[RESTARTED_AT_ANNOTATION],
            "2026-12-02T10:00:00Z"
        );
        assert_eq!(
            before.pod.metadata.annotations.as_ref().unwrap().len(),
            1,
            "no request, no annotation: the hash of today's Pods is kept"
        );
        // The field taken out of the spec while the Pod of the last request runs: the request
        // in force is the Pod's, the same hash.
        let home = PathBuf::from("/containers/30001");
        let removed = build(&WorkloadInput {
            container: &container(plain),
            uid: 30001,
            memory_mb: 64,
            server: "server-1",
            image: "debian:bookworm-slim",
            home: &home,
            root: Root::Image,
            distro_trees: None,
            restarted_at: Some("2026-12-02T10:05:00Z"),
        });
        assert_eq!(
            hash(&removed),
            hash(&second),
            "removing restartedAt restarts nothing"
        );
    }

    #[test]
    fn a_storage_container_sees_its_distro_trees_in_its_home() {
        let c = container(
            json!({"server": "server-1", "memory": 64, "storage": 100, "distro": "bookworm", "customDistrosStorage": true}),
        );
        let home = PathBuf::from("/containers/30001");
        let trees = PathBuf::from("/containers/.distros/30001");
        let workload = build(&WorkloadInput {
            container: &c,
            uid: 30001,
            memory_mb: 64,
            server: "server-1",
            image: "debian:bookworm-slim",
            home: &home,
            root: Root::Image,
            distro_trees: Some(&trees),
            restarted_at: None,
        });
        let pv = serde_json::to_value(&workload.volumes[1].0).unwrap();
        assert_eq!(pv["spec"]["local"]["path"], "/containers/.distros/30001");
        let pod = serde_json::to_value(&workload.pod).unwrap();
        let mounts = pod["spec"]["containers"][0]["volumeMounts"]
            .as_array()
            .unwrap();
        assert_eq!(mounts[0]["mountPath"], "/containers/30001");
        assert_eq!(mounts[1]["mountPath"], "/containers/30001/distros");
        assert_eq!(mounts[1]["name"], "distros");
    }

    #[test]
    fn only_restart_worthy_changes_change_the_hash() {
        let base =
            json!({"server": "server-1", "memory": 64, "storage": 100, "distro": "bookworm"});
        let hash = |spec: serde_json::Value| {
            let c = container(spec);
            build_for(&c, Root::Image).pod.metadata.annotations.unwrap()[SPEC_HASH_ANNOTATION]
                .clone()
        };
        let original = hash(base.clone());
        let mut keys = base.clone();
        keys["sshKeys"] = json!(["ssh-ed25519 AAAA"]);
        keys["tags"] = json!(["web"]);
        keys["note"] = json!("hot");
        keys["storage"] = json!(200);
        assert_eq!(
            hash(keys),
            original,
            "ssh keys, tags, notes and storage apply without a restart"
        );
        let mut memory = base;
        memory["memory"] = json!(128);
        assert_ne!(hash(memory), original, "memory needs a new Pod");
    }
}
