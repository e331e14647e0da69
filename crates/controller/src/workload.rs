//! The objects that run an admitted container: its Pod and the local PersistentVolumes (with
//! their claims) that bring the home and the custom distro to it. Pure builders.
//!
//! Homes reach the Pod as pre-bound local PersistentVolumes rather than hostPath volumes, so
//! customer namespaces can enforce the `restricted` Pod Security Standard: only the agent
//! touches host paths.

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::api::core::v1::{
    Capabilities, Container as PodContainer, EnvVar, LocalVolumeSource, NodeSelector,
    NodeSelectorRequirement, NodeSelectorTerm, ObjectReference, PersistentVolume,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource,
    PersistentVolumeSpec, Pod, PodSecurityContext, PodSpec, ResourceRequirements, SeccompProfile,
    SecurityContext, Volume, VolumeMount, VolumeNodeAffinity, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};
use uwsgi_it_api::Container;

/// Label on every object the operator creates.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "uwsgi-it-operator");
/// Label naming the Container a Pod or claim belongs to.
pub const CONTAINER_LABEL: &str = "uwsgi.it/container";
/// Annotation holding the hash of everything whose change needs a new Pod.
pub const SPEC_HASH_ANNOTATION: &str = "uwsgi.it/spec-hash";
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
    /// The distro image.
    pub image: &'a str,
    /// The home directory on the server.
    pub home: &'a Path,
    /// The custom distro's directory on the server, when it uses one.
    pub custom_distro: Option<&'a Path>,
}

/// The objects of one container's workload.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    /// Volumes with the claims bound to them: the home, then the custom distro if any.
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
        "ReadWriteOnce",
        &labels,
        &owner,
    )];
    if let Some(distro) = input.custom_distro {
        volumes.push(local_volume(
            &format!("uwsgi-it-distro-{}", input.uid),
            &format!("{name}-distro"),
            &namespace,
            distro,
            input.server,
            Quantity("1Mi".into()),
            "ReadOnlyMany",
            &labels,
            &owner,
        ));
    }

    let home_path = home_mount_path(input.uid);
    let memory = Quantity(format!("{}Mi", input.memory_mb.max(1)));
    let mut mounts = vec![VolumeMount {
        name: "home".into(),
        mount_path: home_path.clone(),
        ..VolumeMount::default()
    }];
    let mut pod_volumes = vec![claim_volume("home", &volumes[0].1, false)];
    if let Some((_, claim)) = volumes.get(1) {
        mounts.push(VolumeMount {
            name: "distro".into(),
            mount_path: "/distro".into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
        pod_volumes.push(claim_volume("distro", claim, true));
    }
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
            command: Some(vec![EMPEROR_BINARY.into()]),
            args: Some(emperor_args(&home_path)),
            working_dir: Some(home_path.clone()),
            env: Some(vec![
                env("HOME", &home_path),
                env("UWSGI_IT_UID", &input.uid.to_string()),
            ]),
            resources: Some(ResourceRequirements {
                requests: Some(BTreeMap::from([("memory".to_string(), memory.clone())])),
                limits: Some(BTreeMap::from([("memory".to_string(), memory)])),
                ..ResourceRequirements::default()
            }),
            security_context: Some(SecurityContext {
                allow_privilege_escalation: Some(false),
                run_as_non_root: Some(true),
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
    let hash = spec_hash(&spec);
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(namespace),
            labels: Some(labels),
            annotations: Some(BTreeMap::from([(SPEC_HASH_ANNOTATION.to_string(), hash)])),
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
    access_mode: &str,
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
            access_modes: Some(vec![access_mode.to_string()]),
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
            access_modes: Some(vec![access_mode.to_string()]),
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

fn claim_volume(name: &str, claim: &PersistentVolumeClaim, read_only: bool) -> Volume {
    Volume {
        name: name.to_string(),
        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
            claim_name: claim.name_any(),
            read_only: Some(read_only),
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
    let bytes = serde_json::to_vec(spec).expect("a PodSpec serialises");
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

    fn build_for(c: &Container, distro: Option<&Path>) -> Workload {
        let home = PathBuf::from("/containers/30001");
        build(&WorkloadInput {
            container: c,
            uid: 30001,
            memory_mb: c.spec.memory,
            server: "server-1",
            image: "debian:bookworm-slim",
            home: &home,
            custom_distro: distro,
        })
    }

    #[test]
    fn pod_is_pinned_unprivileged_and_sized() {
        let c = container(
            json!({"server": "203.0.113.10", "memory": 1000, "storage": 20000, "distro": "bookworm"}),
        );
        let workload = build_for(&c, None);
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
        let workload = build_for(&c, None);
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
    fn custom_distro_is_mounted_read_only_at_distro() {
        let c = container(
            json!({"server": "server-1", "memory": 64, "storage": 100, "distro": "bookworm", "customDistro": "ubuntu0001"}),
        );
        let distro = PathBuf::from("/containers/30002/distros/ubuntu0001");
        let workload = build_for(&c, Some(&distro));
        let pod = serde_json::to_value(&workload.pod).unwrap();
        let mounts = &pod["spec"]["containers"][0]["volumeMounts"];
        assert_eq!(mounts[1]["mountPath"], "/distro");
        assert_eq!(mounts[1]["readOnly"], true);
        assert_eq!(
            pod["spec"]["volumes"][1]["persistentVolumeClaim"]["readOnly"],
            true
        );
        let pv = serde_json::to_value(&workload.volumes[1].0).unwrap();
        assert_eq!(
            pv["spec"]["local"]["path"],
            "/containers/30002/distros/ubuntu0001"
        );
        assert_eq!(pv["spec"]["accessModes"], json!(["ReadOnlyMany"]));
    }

    #[test]
    fn only_restart_worthy_changes_change_the_hash() {
        let base =
            json!({"server": "server-1", "memory": 64, "storage": 100, "distro": "bookworm"});
        let hash = |spec: serde_json::Value| {
            let c = container(spec);
            build_for(&c, None).pod.metadata.annotations.unwrap()[SPEC_HASH_ANNOTATION].clone()
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
