//! The Container reconciler: finalizer, workload, deletion.
//!
//! Admission is the Server reconciler's (it alone writes the ledger); this one makes sure a
//! container carries the finalizer before it can be admitted, refuses what names no Server,
//! runs the workload of an admitted container (the projection in its status), and on deletion
//! stops the Pod, waits for the agent to release the home, commits the release to the ledger
//! and only then lets the container go.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};
use uwsgi_it_api::condition::HasConditions;
use uwsgi_it_api::condition::{self, AVAILABLE, HOME_READY, RUNNING};
use uwsgi_it_api::well_known::{CONTROLLER_FINALIZER, FORCE_RELEASE_ANNOTATION};
use uwsgi_it_api::{Container, CustomDistro};
use uwsgi_it_domain::distro::{RootRefusal, RunnableRoot, check_custom_distro, runnable_root};

use crate::Error;
use crate::admission::{AdmissionRecord, refuse_unplaced, release};
use crate::context::Context;
use crate::facts::{container_facts, distro_facts};
use crate::status::{Desired, WORKLOAD_MANAGER, apply_status};
use crate::workload::{
    CONTAINER_LABEL, RESTARTED_AT_ANNOTATION, Root, SPEC_HASH_ANNOTATION, WorkloadInput, build,
};

/// Reason the agent gives on `HomeReady=False` once it has archived, retained or deleted the
/// home of a container being deleted; the finalizer is released on it.
pub const HOME_RELEASED_REASON: &str = "HomeReleased";

/// Reason of `Running=False` once a deleted container's Pod is gone: the agent's cue to
/// archive the home.
pub const STOPPED_REASON: &str = "Stopped";

/// How often a healthy container is looked at again without any event.
const RESYNC: Duration = Duration::from_secs(300);
/// How soon a container whose volumes are being bound is looked at again. Volumes and claims
/// are not watched (a cluster-wide watch for a wait of milliseconds once per Pod start): polled
/// quickly while the claim is young, slowly after that (a claim that does not bind is stuck).
const VOLUME_POLL: Duration = Duration::from_millis(100);
const VOLUME_POLL_STUCK: Duration = Duration::from_secs(5);
const VOLUME_YOUNG: Duration = Duration::from_secs(10);
/// The shortest life after which a Failed Pod is replaced.
const MIN_POD_LIFETIME: Duration = Duration::from_secs(10);

/// Reconciles one Container.
pub async fn reconcile(container: Arc<Container>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started("container");
    ctx.wait_synced().await;
    if container.metadata.deletion_timestamp.is_some() {
        return finalize(&container, &ctx).await;
    }
    ensure_finalizer(&container, &ctx).await?;

    // Resolve: a container that names no Server (or an ambiguous address) is told so here;
    // everything else is decided by its Server's pass.
    let unplaced = ctx.directory.named_by(&container).err();
    if let Some(problem) = unplaced {
        refuse_unplaced(&ctx, &container, &problem).await?;
    }
    let record = AdmissionRecord::cached(&container);
    let next = reconcile_workload(&container, &record, &ctx).await?;
    Ok(Action::requeue(next))
}

async fn ensure_finalizer(container: &Container, ctx: &Context) -> Result<(), Error> {
    if container
        .finalizers()
        .iter()
        .any(|f| f == CONTROLLER_FINALIZER)
    {
        return Ok(());
    }
    let mut finalizers = container.finalizers().to_vec();
    finalizers.push(CONTROLLER_FINALIZER.to_string());
    let patch = json!({"metadata": {
        "finalizers": finalizers,
        "resourceVersion": container.resource_version(),
    }});
    api(ctx, container)
        .patch(
            &container.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    ctx.metrics.finalizer_written();
    Ok(())
}

fn api(ctx: &Context, container: &Container) -> Api<Container> {
    Api::namespaced(
        ctx.client.clone(),
        &container.namespace().unwrap_or_default(),
    )
}

/// What the workload part of the status should say.
struct WorkloadStatus {
    running: Option<Desired>,
    ip: Option<String>,
    usable: Vec<String>,
}

/// Runs the container's workload; returns when to look again.
async fn reconcile_workload(
    container: &Container,
    record: &AdmissionRecord,
    ctx: &Context,
) -> Result<Duration, Error> {
    let namespace = container.namespace().unwrap_or_default();
    let distro_objects = ctx.distros_in(&namespace);
    let distros: Vec<_> = distro_objects.iter().map(|d| distro_facts(d)).collect();
    // The namespace's containers matter only to custom distros: without any, skip the O(N) scan.
    let facts: Vec<_> = if distros.is_empty() {
        Vec::new()
    } else {
        ctx.containers_in(&namespace)
            .iter()
            .map(|c| {
                let r = AdmissionRecord::cached(c);
                container_facts(c, r.server.clone(), r.is_admitted())
            })
            .collect()
    };
    let me = container_facts(container, record.server.clone(), record.is_admitted());
    let usable = uwsgi_it_domain::distro::usable_distros(&me, &distros, &facts);

    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    // A container that has no distro and shows no trace of a workload (no Running condition, no
    // address: both are written whenever a Pod is created or seen) has no Pod to look up.
    let never_ran = container.spec.distro.is_none()
        && container.spec.custom_distro.is_none()
        && container
            .status
            .as_ref()
            .is_none_or(|s| s.ip.is_none() && condition::find(&s.conditions, RUNNING).is_none());
    let existing = if never_ran {
        None
    } else {
        pods.get_opt(&container.name_any()).await?
    };
    let restarted_at = container.spec.restarted_at.as_deref().or_else(|| {
        existing
            .as_ref()
            .and_then(|pod| pod.annotations().get(RESTARTED_AT_ANNOTATION))
            .map(String::as_str)
    });
    let plan = plan_workload(
        container,
        record,
        ctx,
        &me,
        &DistroView {
            objects: &distro_objects,
            distros: &distros,
            containers: &facts,
        },
        restarted_at,
    );
    let status = match plan {
        // Nothing running is lost for a distro the customer is refilling or broke: a Pod that
        // is what it should be keeps its mounts (made from what was there when it started) and
        // goes on; only a new Pod waits for a usable tree. A Pod that needs a restart anyway
        // (a memory change, another distro) is stopped: its old limits must not outlive the
        // reservation.
        Err(why)
            if why.pod_hash.is_some()
                && existing
                    .as_ref()
                    .and_then(|p| p.annotations().get(SPEC_HASH_ANNOTATION))
                    == why.pod_hash.as_ref() =>
        {
            let pod = existing.as_ref().expect("checked above");
            let mut status = pod_status(pod, usable);
            if let Some(running) = status.running.as_mut() {
                running.message =
                    format!("{}; a new Pod would wait: {}", running.message, why.message);
            }
            status
        }
        Err(why) => {
            if let Some(pod) = &existing {
                stop_pod(ctx, container, pod, &why.message).await?;
            }
            WorkloadStatus {
                running: why.into_condition(),
                ip: None,
                usable,
            }
        }
        Ok(workload) => {
            if existing.is_none() {
                if let Some((waiting, poll)) =
                    bind_volumes(ctx, &namespace, &workload.volumes).await?
                {
                    let status = WorkloadStatus {
                        running: Some(Desired::no(RUNNING, "WaitingForVolume", waiting)),
                        ip: None,
                        usable,
                    };
                    write_workload_status(container, ctx, status).await?;
                    return Ok(poll);
                }
                delete_stale_volumes(ctx, container, &workload.volumes).await?;
            }
            let wanted = workload
                .pod
                .annotations()
                .get(SPEC_HASH_ANNOTATION)
                .cloned();
            match existing {
                Some(pod) if pod.annotations().get(SPEC_HASH_ANNOTATION) != wanted.as_ref() => {
                    stop_pod(ctx, container, &pod, "restart-worthy fields changed").await?;
                    WorkloadStatus {
                        running: Some(Desired::no(RUNNING, "Restarting", "replacing the Pod")),
                        ip: None,
                        usable,
                    }
                }
                // Failed (an eviction, a node that lost it) or Succeeded (the Emperor exited
                // with restartPolicy Always cannot, but a kubelet may say so): a Pod that will
                // never run again is replaced; the next pass creates the new one.
                Some(pod) if pod_is_finished(&pod) => {
                    let phase = pod_phase(&pod);
                    // A Pod the kubelet refuses at once (out of memory on the node, say) fails
                    // as soon as it is made: replacing it no sooner than MIN_POD_LIFETIME after
                    // its creation keeps that from becoming a create/delete loop.
                    let age = pod
                        .creation_timestamp()
                        .map(|t| {
                            let elapsed = k8s_openapi::jiff::Timestamp::now().duration_since(t.0);
                            Duration::try_from(elapsed).unwrap_or_default()
                        })
                        .unwrap_or(MIN_POD_LIFETIME);
                    if age < MIN_POD_LIFETIME {
                        let wait = MIN_POD_LIFETIME - age;
                        let status = WorkloadStatus {
                            running: Some(Desired::no(
                                RUNNING,
                                format!("Pod{phase}"),
                                format!(
                                    "the Pod is {phase} {}s after its creation; replacing it in {}s",
                                    age.as_secs(),
                                    wait.as_secs() + 1
                                ),
                            )),
                            ip: None,
                            usable,
                        };
                        write_workload_status(container, ctx, status).await?;
                        return Ok(wait);
                    }
                    stop_pod(ctx, container, &pod, &format!("the Pod is {phase}")).await?;
                    WorkloadStatus {
                        running: Some(Desired::no(
                            RUNNING,
                            format!("Pod{phase}"),
                            format!("the Pod is {phase}; replacing it"),
                        )),
                        ip: None,
                        usable,
                    }
                }
                Some(pod) => pod_status(&pod, usable),
                None => {
                    pods.create(&PostParams::default(), &workload.pod).await?;
                    info!(container = %container.name_any(), %namespace, "created the workload Pod");
                    ctx.publish(
                        &container.object_ref(&()),
                        Event {
                            type_: EventType::Normal,
                            reason: "PodCreated".into(),
                            note: Some(format!(
                                "Pod {} on server {}",
                                container.name_any(),
                                record.server.clone().unwrap_or_default()
                            )),
                            action: "Run".into(),
                            secondary: None,
                        },
                    )
                    .await;
                    WorkloadStatus {
                        running: Some(Desired::no(
                            RUNNING,
                            "PodCreated",
                            "waiting for the Pod to start",
                        )),
                        ip: None,
                        usable,
                    }
                }
            }
        }
    };
    write_workload_status(container, ctx, status).await?;
    Ok(RESYNC)
}

/// Annotation the controller sets on a claim whose volume exists, to have Kubernetes' PV
/// controller look at the claim again (see [`bind_volumes`]); its value is the volume's
/// resourceVersion, so each change of the volume gets one more look.
const VOLUME_SEEN_ANNOTATION: &str = "uwsgi.it/volume-seen";

/// Makes the workload's volumes and claims and waits until each pair is bound; returns what is
/// still awaited and when to look again, or `None` when the Pod can be created (a kubelet that
/// finds a claim unbound backs off before it looks again).
///
/// The order is what lets Kubernetes' PV controller bind at once instead of at its periodic
/// resync (15 s by default): the claim first, then its volume pre-bound to the claim's *uid*
/// (the PV controller marks it `Bound` without writing anything else), then an update of the
/// claim, which makes the PV controller finish the binding on the claim. A volume pre-bound by
/// name only makes the PV controller's volume and claim workers race on the volume's status,
/// and the loser waits for the resync (measured: 12-27 s from apply to a running Pod). The uid
/// also means no later claim of the same name can take the volume.
async fn bind_volumes(
    ctx: &Context,
    namespace: &str,
    volumes: &[(PersistentVolume, PersistentVolumeClaim)],
) -> Result<Option<(String, Duration)>, Error> {
    let volume_api = Api::<PersistentVolume>::all(ctx.client.clone());
    let claim_api = Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), namespace);
    for (volume, claim) in volumes {
        let claim_name = claim.name_any();
        let claimed = match claim_api.get_opt(&claim_name).await? {
            Some(claimed) => claimed,
            None => match claim_api.create(&PostParams::default(), claim).await {
                Ok(created) => created,
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    return Ok(Some((format!("claim {claim_name} created"), VOLUME_POLL)));
                }
                Err(e) => return Err(e.into()),
            },
        };
        let young = claimed.creation_timestamp().is_none_or(|t| {
            let age = k8s_openapi::jiff::Timestamp::now().duration_since(t.0);
            Duration::try_from(age).unwrap_or_default() < VOLUME_YOUNG
        });
        let poll = if young {
            VOLUME_POLL
        } else {
            VOLUME_POLL_STUCK
        };
        if claimed.metadata.deletion_timestamp.is_some() {
            return Ok(Some((
                format!("claim {claim_name} is being deleted"),
                VOLUME_POLL_STUCK,
            )));
        }
        let claim_phase = claimed.status.as_ref().and_then(|s| s.phase.as_deref());
        if claim_phase == Some("Bound") {
            continue;
        }
        let volume_name = volume.name_any();
        let Some(current) = volume_api.get_opt(&volume_name).await? else {
            let mut volume = volume.clone();
            if let Some(reference) = volume.spec.as_mut().and_then(|s| s.claim_ref.as_mut()) {
                reference.uid = claimed.metadata.uid.clone();
            }
            create_if_missing(&volume_api, &volume).await?;
            return Ok(Some((format!("volume {volume_name} created"), VOLUME_POLL)));
        };
        let seen = current.resource_version();
        if claimed.annotations().get(VOLUME_SEEN_ANNOTATION) != seen.as_ref() {
            let patch = serde_json::json!({
                "metadata": {"annotations": {VOLUME_SEEN_ANNOTATION: seen}}
            });
            claim_api
                .patch(&claim_name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
        }
        let volume_phase = current.status.as_ref().and_then(|s| s.phase.as_deref());
        return Ok(Some((
            format!(
                "volume {volume_name} is {}, claim {claim_name} is {}",
                volume_phase.unwrap_or("new"),
                claim_phase.unwrap_or("new")
            ),
            poll,
        )));
    }
    Ok(None)
}

/// Why a container has no workload (yet).
struct NoWorkload {
    reason: &'static str,
    message: String,
    /// Whether this is worth a `Running=False` condition (a container without a distro has
    /// no workload by design and gets no Running condition at all).
    report: bool,
    /// Set when only the custom distro's tree is not usable *now*: the spec hash of the Pod that
    /// would run (it does not depend on the tree's contents), so that a Pod already running as
    /// it should may go on.
    pod_hash: Option<String>,
}

impl NoWorkload {
    fn new(reason: &'static str, message: impl Into<String>) -> Self {
        NoWorkload {
            reason,
            message: message.into(),
            report: true,
            pod_hash: None,
        }
    }
}

impl NoWorkload {
    fn into_condition(self) -> Option<Desired> {
        self.report
            .then(|| Desired::no(RUNNING, self.reason, self.message))
    }
}

/// The custom distros of the container's namespace, as objects and as the facts the pure rules
/// decide from, with the facts of its containers.
#[derive(Clone, Copy)]
struct DistroView<'a> {
    objects: &'a [Arc<CustomDistro>],
    distros: &'a [uwsgi_it_domain::distro::DistroFacts],
    containers: &'a [uwsgi_it_domain::distro::ContainerFacts],
}

fn plan_workload(
    container: &Container,
    record: &AdmissionRecord,
    ctx: &Context,
    me: &uwsgi_it_domain::distro::ContainerFacts,
    view: &DistroView<'_>,
    restarted_at: Option<&str>,
) -> Result<crate::workload::Workload, NoWorkload> {
    let DistroView {
        objects: distro_objects,
        distros,
        containers: facts,
    } = *view;
    let custom_name = container.spec.custom_distro.as_deref();
    let platform = container.spec.distro.as_deref();
    if custom_name.is_none() && platform.is_none() {
        return Err(NoWorkload {
            report: false,
            ..NoWorkload::new(
                "NoDistro",
                "no distro: the container has a home but no workload",
            )
        });
    }
    let (Some(uid), Some(server), true) =
        (record.uid, record.server.as_deref(), record.is_admitted())
    else {
        return Err(NoWorkload::new("NotAdmitted", "waiting for admission"));
    };
    let image = match (custom_name, platform) {
        (Some(_), _) => ctx.config.custom_distro_image.as_deref().ok_or_else(|| {
            NoWorkload::new(
                "NoCustomDistroImage",
                "the operator has no customDistroImage configured, so containers cannot run on custom distros",
            )
        })?,
        (None, Some(distro)) => ctx.config.distros.get(distro).ok_or_else(|| {
            NoWorkload::new(
                "UnknownDistro",
                format!(
                    "distro {distro} is not in the operator's distro table (known: {})",
                    ctx.config
                        .distros
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        })?,
        (None, None) => unreachable!("checked above"),
    };
    if !condition::is_true(container.conditions(), HOME_READY) {
        return Err(NoWorkload::new(
            "WaitingForHome",
            format!("waiting for the agent on server {server} to prepare the home"),
        ));
    }
    let accepted = check_custom_distro(me, distros, facts)
        .map_err(|refusal| NoWorkload::new(refusal.reason(), refusal.to_string()))?;
    let uid = u32::try_from(uid)
        .map_err(|_| NoWorkload::new("InvalidUid", format!("uid {uid} is out of range")))?;
    let home_root = &ctx.config.home_root;
    let home = uwsgi_it_domain::paths::home_dir(home_root, uid)
        .map_err(|e| NoWorkload::new("InvalidHome", e.to_string()))?;
    let distro_trees = if container.spec.custom_distros_storage {
        Some(
            uwsgi_it_domain::paths::storage_distros_dir(home_root, uid)
                .map_err(|e| NoWorkload::new("InvalidHome", e.to_string()))?,
        )
    } else {
        None
    };
    let memory_mb = record
        .reserved
        .as_ref()
        .map_or(container.spec.memory, |r| r.memory);
    let build_on = |root: Root<'_>| {
        build(&WorkloadInput {
            container,
            uid,
            memory_mb,
            server,
            image,
            home: &home,
            root,
            distro_trees: distro_trees.as_deref(),
            restarted_at,
        })
    };
    let (Some(accepted), Some(name)) = (accepted, custom_name) else {
        return Ok(build_on(Root::Image));
    };
    let (tree, root) = custom_root(container, ctx, distro_objects, &accepted, name)?;
    match root {
        Ok(root) => Ok(build_on(Root::CustomDistro {
            tree: &tree,
            root: &root,
        })),
        Err(mut why) => {
            let placeholder = RunnableRoot {
                directories: Vec::new(),
                emperor: String::new(),
            };
            let would_be = build_on(Root::CustomDistro {
                tree: &tree,
                root: &placeholder,
            });
            why.pod_hash = would_be
                .pod
                .annotations()
                .get(SPEC_HASH_ANNOTATION)
                .cloned();
            Err(why)
        }
    }
}

/// The tree of the custom distro `name` on the server and what the agent found in it, checked.
fn custom_root(
    container: &Container,
    ctx: &Context,
    distro_objects: &[Arc<CustomDistro>],
    accepted: &uwsgi_it_domain::distro::AcceptedDistro,
    name: &str,
) -> Result<(PathBuf, Result<RunnableRoot, NoWorkload>), NoWorkload> {
    let namespace = container.namespace().unwrap_or_default();
    let storage_uid = ctx
        .containers
        .get(&ObjectRef::new(&accepted.storage_container).within(&namespace))
        .and_then(|c| AdmissionRecord::cached(&c).uid)
        .and_then(|u| u32::try_from(u).ok());
    let distro = distro_objects.iter().find(|d| d.name_any() == name);
    let (Some(storage_uid), Some(distro)) = (storage_uid, distro) else {
        return Err(NoWorkload::new(
            "CustomDistroNotReady",
            format!("custom distro {name} has no storage uid yet"),
        ));
    };
    let tree = uwsgi_it_domain::paths::custom_distro_dir(
        &ctx.config.home_root,
        storage_uid,
        &distro.spec.path,
    )
    .map_err(|e| NoWorkload::new("InvalidCustomDistroPath", e.to_string()))?;
    let status = distro.status.as_ref();
    let conditions = status.map(|s| s.conditions.as_slice()).unwrap_or_default();
    let unavailable = |why: String| {
        NoWorkload::new(
            "CustomDistroUnavailable",
            RootRefusal::NotAvailable {
                distro: name.to_owned(),
                why,
            }
            .to_string(),
        )
    };
    let surveyed = status.and_then(|s| s.root.as_ref());
    let root = match (condition::find(conditions, AVAILABLE), surveyed) {
        (Some(available), Some(root)) if available.status == "True" => {
            runnable_root(name, &root.directories, &root.emperor)
                .map_err(|refusal| NoWorkload::new("CustomDistroUnusable", refusal.to_string()))
        }
        (Some(available), _) => Err(unavailable(format!(
            "{} ({})",
            available.message, available.reason
        ))),
        (None, _) => Err(unavailable(format!(
            "the agent on server {} has not looked at it yet",
            accepted.server
        ))),
    };
    Ok((tree, root))
}

/// Deletes the container's claims (and their volumes) that its workload no longer uses: the
/// volume of a custom distro it ran on before. Called only while no Pod of it exists, so
/// nothing mounted is pulled away.
async fn delete_stale_volumes(
    ctx: &Context,
    container: &Container,
    wanted: &[(PersistentVolume, PersistentVolumeClaim)],
) -> Result<(), Error> {
    let namespace = container.namespace().unwrap_or_default();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &namespace);
    let volumes: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let selector = format!("{CONTAINER_LABEL}={}", container.name_any());
    for claim in claims
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
    {
        let name = claim.name_any();
        if wanted.iter().any(|(_, c)| c.name_any() == name) || !owned_by(&claim, container) {
            continue;
        }
        let volume = claim.spec.as_ref().and_then(|s| s.volume_name.clone());
        delete_if_present(&claims, &name).await?;
        if let Some(volume) = volume {
            delete_if_present(&volumes, &volume).await?;
        }
        info!(container = %container.name_any(), %namespace, claim = %name, "deleted a volume the workload no longer uses");
    }
    Ok(())
}

/// Whether `object` is controlled by this very Container (not an earlier one of the same name).
fn owned_by<K: Resource>(object: &K, container: &Container) -> bool {
    let uid = container.metadata.uid.as_deref();
    object
        .owner_references()
        .iter()
        .any(|o| o.controller == Some(true) && Some(o.uid.as_str()) == uid)
}

fn pod_phase(pod: &Pod) -> String {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_else(|| "Pending".into())
}

/// A Pod in a terminal phase never runs again, whatever its restart policy.
fn pod_is_finished(pod: &Pod) -> bool {
    matches!(pod_phase(pod).as_str(), "Failed" | "Succeeded")
}

fn pod_status(pod: &Pod, usable: Vec<String>) -> WorkloadStatus {
    let status = pod.status.as_ref();
    let phase = status
        .and_then(|s| s.phase.clone())
        .unwrap_or_else(|| "Pending".into());
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let ip = status.and_then(|s| s.pod_ip.clone());
    let running = if phase == "Running" && ready {
        Desired::yes(
            RUNNING,
            "PodRunning",
            format!(
                "Pod running with address {}",
                ip.clone().unwrap_or_default()
            ),
        )
    } else {
        // What the kubelet says about the container (CreateContainerConfigError for a subPath
        // of a custom distro that is now a symlink out of it, CrashLoopBackOff, ...) is the
        // first thing a person needs.
        let waiting = status
            .and_then(|s| s.container_statuses.as_ref())
            .into_iter()
            .flatten()
            .find_map(|c| c.state.as_ref()?.waiting.clone());
        match waiting {
            Some(waiting) => Desired::no(
                RUNNING,
                format!("Pod{phase}"),
                format!(
                    "Pod is {phase}: {}{}",
                    waiting.reason.unwrap_or_default(),
                    waiting
                        .message
                        .map(|m| format!(": {m}"))
                        .unwrap_or_default()
                ),
            ),
            None => Desired::no(RUNNING, format!("Pod{phase}"), format!("Pod is {phase}")),
        }
    };
    WorkloadStatus {
        running: Some(running),
        ip,
        usable,
    }
}

async fn stop_pod(ctx: &Context, container: &Container, pod: &Pod, why: &str) -> Result<(), Error> {
    if pod.metadata.deletion_timestamp.is_some() {
        return Ok(());
    }
    let pods: Api<Pod> = Api::namespaced(
        ctx.client.clone(),
        &container.namespace().unwrap_or_default(),
    );
    // Only this Pod: if it was replaced since it was read, the new one is not deleted.
    let params = DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            uid: pod.metadata.uid.clone(),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match pods.delete(&pod.name_any(), &params).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    info!(container = %container.name_any(), why, "stopped the workload Pod");
    ctx.publish(
        &container.object_ref(&()),
        Event {
            type_: EventType::Normal,
            reason: "PodStopped".into(),
            note: Some(why.to_string()),
            action: "Stop".into(),
            secondary: None,
        },
    )
    .await;
    Ok(())
}

async fn create_if_missing<K>(api: &Api<K>, object: &K) -> Result<(), Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    match api.create(&PostParams::default(), object).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn write_workload_status(
    container: &Container,
    ctx: &Context,
    status: WorkloadStatus,
) -> Result<(), Error> {
    let current = container.status.clone().unwrap_or_default();
    let running_same = match &status.running {
        Some(desired) => desired.matches(&current.conditions, container.metadata.generation),
        None => condition::find(&current.conditions, RUNNING).is_none(),
    };
    if running_same && current.ip == status.ip && current.usable_custom_distros == status.usable {
        return Ok(());
    }
    let mut body = json!({});
    if let Some(desired) = &status.running {
        body["conditions"] =
            json!([desired.to_condition(&current.conditions, container.metadata.generation)]);
    }
    if let Some(ip) = &status.ip {
        body["ip"] = json!(ip);
    }
    if !status.usable.is_empty() {
        body["usableCustomDistros"] = json!(status.usable);
    }
    apply_status(&api(ctx, container), container, WORKLOAD_MANAGER, body).await?;
    Ok(())
}

/// Deletion: stop the Pod, remove the volume objects, wait for the agent to archive the home,
/// then free the reservation by releasing the finalizer.
async fn finalize(container: &Container, ctx: &Context) -> Result<Action, Error> {
    if !container
        .finalizers()
        .iter()
        .any(|f| f == CONTROLLER_FINALIZER)
    {
        return Ok(Action::await_change());
    }
    let namespace = container.namespace().unwrap_or_default();
    let name = container.name_any();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    if let Some(pod) = pods.get_opt(&name).await? {
        stop_pod(ctx, container, &pod, "the container is being deleted").await?;
        return Ok(Action::requeue(Duration::from_secs(2)));
    }
    // The agent archives the home only once the workload is known to be stopped.
    let conditions = container.conditions();
    if condition::find(conditions, RUNNING).is_some_and(|c| c.reason != STOPPED_REASON) {
        let stopped = Desired::no(
            RUNNING,
            STOPPED_REASON,
            "the container is being deleted; its Pod is gone",
        );
        let body = json!({"conditions": [stopped.to_condition(conditions, container.metadata.generation)]});
        apply_status(&api(ctx, container), container, WORKLOAD_MANAGER, body).await?;
    }
    let record = AdmissionRecord::cached(container);
    if record.uid.is_some() {
        delete_stale_volumes(ctx, container, &[]).await?;
    }
    // The agent archives (or retains, or deletes) the home and says so on HomeReady. Without
    // an agent (the server or its Node is gone for good) the deletion completes after the
    // release timeout, or at once when the supplier says so, with a Warning: the home stays.
    let released = condition::find(container.conditions(), HOME_READY)
        .is_some_and(|c| c.reason == HOME_RELEASED_REASON);
    if record.uid.is_some() && record.server.is_some() && !released {
        let forced = container
            .annotations()
            .get(FORCE_RELEASE_ANNOTATION)
            .is_some_and(|v| v == "true");
        let waited = container
            .metadata
            .deletion_timestamp
            .as_ref()
            .map(|t| {
                let since = k8s_openapi::jiff::Timestamp::now().duration_since(t.0);
                Duration::try_from(since).unwrap_or_default()
            })
            .unwrap_or_default();
        let timeout = ctx.config.release_timeout;
        if !forced && waited < timeout {
            return Ok(Action::requeue(
                (timeout - waited).min(Duration::from_secs(30)),
            ));
        }
        let why = if forced {
            format!("{FORCE_RELEASE_ANNOTATION} is set")
        } else {
            format!("no agent released it within {timeout:?}")
        };
        warn!(container = %name, %namespace, %why, "releasing without the agent; the home is left on the server");
        ctx.publish(
            &container.object_ref(&()),
            Event {
                type_: EventType::Warning,
                reason: "ReleasedWithoutAgent".into(),
                note: Some(format!(
                    "{why}: the reservation is released; home {} is left on server {} as it is",
                    record.home.clone().unwrap_or_default(),
                    record.server.clone().unwrap_or_default()
                )),
                action: "Release".into(),
                secondary: None,
            },
        )
        .await;
    }
    // The ledger first: if anything fails from here on, the finalizer still holds the
    // container and the release is retried.
    if let Some(server) = &record.server {
        release(ctx, server, container).await?;
    }
    let finalizers: Vec<String> = container
        .finalizers()
        .iter()
        .filter(|f| *f != CONTROLLER_FINALIZER)
        .cloned()
        .collect();
    let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": container.resource_version()}});
    api(ctx, container)
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    ctx.metrics.finalizer_written();
    info!(container = %name, %namespace, "deletion complete");
    Ok(Action::await_change())
}

async fn delete_if_present<K>(api: &Api<K>, name: &str) -> Result<(), Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}
