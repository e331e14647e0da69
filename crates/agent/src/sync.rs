//! Port forwards: from this node's accepted PortMappings to the kernel.
//!
//! Event-driven: a PortMapping or Node change wakes the loop, which waits [`DEBOUNCE`] for the
//! rest of a burst and applies the new desired ruleset incrementally
//! ([`ForwardingBackend::apply_incremental`]: only the changed elements, one transaction, no
//! reading of the kernel), so a new mapping carries traffic well within a second whatever the
//! number of mappings. The first sync and a periodic full resync (`portForward.resyncPeriod`) ask
//! the backend to compare the kernel with the desired ruleset ([`ForwardingBackend::apply`]) and
//! rewrite it when they differ: when nothing changed on our side that is drift (someone flushed
//! the ruleset), and it is counted, logged and reported as a Warning Event on the Node. An
//! incremental transaction that the kernel refuses (the table was changed behind the agent's
//! back) falls back to the full path and is reported the same way.
//!
//! [`ForwardingBackend::apply`]: crate::forwarding::ForwardingBackend::apply
//! [`ForwardingBackend::apply_incremental`]: crate::forwarding::ForwardingBackend::apply_incremental
//!
//! The loop only starts once the caches have synced and only ever reads them, so a restart or
//! an API outage (where the caches keep their last state) never writes an emptier ruleset than
//! the one that is working.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{Resource, ResourceExt};
use tracing::{info, warn};
use uwsgi_it_api::condition::{self, ACCEPTED, PROGRAMMED};
use uwsgi_it_api::{Container, PortMapping};
use uwsgi_it_domain::forwarding::{Forward, ForwardingRuleset, Ipv4Cidr, Protocol};
use uwsgi_it_domain::ports::{MappingRefusal, PortPolicy};

use crate::Context;
use crate::address::{declared_public_address, discover_public_address};
use crate::forwarding::ForwardingError;
use crate::listeners::{self, Listener};
use crate::reporter::DesiredCondition;
use crate::scope::Caches;

/// How long a change waits for the rest of its burst (a controller writing several mappings)
/// before the ruleset is applied.
pub const DEBOUNCE: Duration = Duration::from_millis(30);

/// Reason of `Programmed=True`.
pub const PROGRAMMED_REASON: &str = "Programmed";

/// What the agent makes of one of its node's PortMappings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Forwarded.
    Forward(Forward),
    /// The controller has not accepted it (yet, or refused it).
    NotAccepted,
    /// Accepted, but the container has no address yet.
    WaitingForTarget,
    /// Being deleted.
    Deleting,
    /// `status.target` or the ports cannot be forwarded.
    InvalidTarget(String),
    /// An earlier mapping holds the same protocol and public port (the controller refuses the
    /// later one; this only covers the moment before it has).
    Conflict { holder: String },
    /// The public port is outside `publicPorts` or reserved: the agent checks the operator's
    /// configuration itself, whatever the controller (or whoever wrote the status) accepted.
    Refused(MappingRefusal),
    /// A socket of the node already listens on the public port; a forward would take its
    /// traffic.
    HostListening(Listener),
    /// `status.target` is not the address and private port of the mapping's container's own
    /// Pod on this node (a status forged, or gone stale).
    UnverifiedTarget(String),
}

impl Outcome {
    fn condition(&self, public: Option<Ipv4Addr>) -> DesiredCondition {
        let false_ = |reason: &str, message: String| {
            DesiredCondition::new(PROGRAMMED, false, reason, message)
        };
        match self {
            Outcome::Forward(forward) => {
                let public = public.map_or_else(|| "the node".to_owned(), |a| a.to_string());
                DesiredCondition::new(
                    PROGRAMMED,
                    true,
                    PROGRAMMED_REASON,
                    format!(
                        "{public}:{}/{} is forwarded to {}",
                        forward.public_port, forward.protocol, forward.target
                    ),
                )
            }
            Outcome::NotAccepted => false_(
                "NotAccepted",
                "the controller has not accepted this mapping".into(),
            ),
            Outcome::WaitingForTarget => false_(
                "WaitingForTarget",
                "the container has no private address yet".into(),
            ),
            Outcome::Deleting => false_("Deleting", "the mapping is being deleted".into()),
            Outcome::InvalidTarget(message) => false_("InvalidTarget", message.clone()),
            Outcome::Conflict { holder } => false_(
                "PortConflict",
                format!("{holder} holds this protocol and public port on the node"),
            ),
            Outcome::Refused(refusal) => false_(refusal.reason(), refusal.to_string()),
            Outcome::UnverifiedTarget(message) => false_("TargetUnverified", message.clone()),
            Outcome::HostListening(listener) => false_(
                "HostListening",
                format!(
                    "a socket of the node already listens on {listener}; forwarding the port would take its traffic"
                ),
            ),
        }
    }
}

/// The node's forwards and a verdict for every mapping.
#[derive(Debug, Clone, Default)]
pub struct ForwardingPlan {
    pub forwards: Vec<Forward>,
    pub verdicts: Vec<(Arc<PortMapping>, Outcome)>,
}

/// What the agent sees of this node's workloads, to check every forward target itself: the
/// Containers placed on this node and the Pods bound to it.
#[derive(Debug, Clone, Default)]
pub struct Workloads {
    /// (namespace, name) → uid of the Containers on this node.
    containers: HashMap<(String, String), String>,
    /// (namespace, name) → (uid of its controlling owner, IPv4 address) of the Pods on it.
    pods: HashMap<(String, String), (Option<String>, Option<std::net::Ipv4Addr>)>,
}

impl Workloads {
    /// From the caches; `containers` already this node's, `pods` those bound to `node`.
    pub fn new(containers: &[Arc<Container>], pods: &[Arc<Pod>], node: &str) -> Workloads {
        let key = |meta: &kube::api::ObjectMeta| {
            (
                meta.namespace.clone().unwrap_or_default(),
                meta.name.clone().unwrap_or_default(),
            )
        };
        Workloads {
            containers: containers
                .iter()
                .filter_map(|c| Some((key(c.meta()), c.meta().uid.clone()?)))
                .collect(),
            pods: pods
                .iter()
                .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
                // A finished Pod's address may already be another Pod's.
                .filter(|p| {
                    !matches!(
                        p.status.as_ref().and_then(|s| s.phase.as_deref()),
                        Some("Succeeded" | "Failed")
                    )
                })
                .map(|p| {
                    let owner = p
                        .meta()
                        .owner_references
                        .iter()
                        .flatten()
                        .find(|o| o.controller == Some(true) && o.kind == "Container")
                        .map(|o| o.uid.clone());
                    let ip = p
                        .status
                        .as_ref()
                        .and_then(|s| s.pod_ip.as_deref())
                        .and_then(|ip| ip.parse().ok());
                    (key(p.meta()), (owner, ip))
                })
                .collect(),
        }
    }

    /// Whether `target` is the address of `container`'s own Pod on this node at `private_port`.
    fn verify(
        &self,
        namespace: &str,
        container: &str,
        target: SocketAddrV4,
        private_port: i32,
    ) -> Result<(), String> {
        let key = (namespace.to_owned(), container.to_owned());
        let uid = self
            .containers
            .get(&key)
            .ok_or_else(|| format!("container {container} is not on this node"))?;
        let (owner, ip) = self
            .pods
            .get(&key)
            .ok_or_else(|| format!("container {container} has no Pod on this node"))?;
        if owner.as_ref() != Some(uid) {
            return Err(format!(
                "Pod {container} on this node is not container {container}'s workload"
            ));
        }
        if *ip != Some(*target.ip()) {
            let actual = ip.map_or_else(|| "none yet".to_owned(), |ip| ip.to_string());
            return Err(format!(
                "status.target {target} is not the address of container {container}'s Pod ({actual})"
            ));
        }
        if i32::from(target.port()) != private_port {
            return Err(format!(
                "status.target {target} is not the mapping's privatePort {private_port}"
            ));
        }
        Ok(())
    }
}

/// Decides which of the node's mappings are forwarded. Pure: the caller has already kept only
/// this node's mappings. Earlier mappings (creation time, then namespace/name) win a port, as
/// in the controller's admission; a port outside `policy` is never forwarded, nor a target that
/// is not the container's own Pod on this node.
pub fn plan_forwards(
    mappings: &[Arc<PortMapping>],
    policy: &PortPolicy,
    workloads: &Workloads,
) -> ForwardingPlan {
    let mut ordered: Vec<&Arc<PortMapping>> = mappings.iter().collect();
    ordered.sort_by_key(|m| {
        (
            m.meta().creation_timestamp.clone().map(|t| t.0),
            m.namespace(),
            m.name_any(),
        )
    });
    let mut holders: BTreeMap<(Protocol, u16), String> = BTreeMap::new();
    let mut plan = ForwardingPlan::default();
    for mapping in ordered {
        let outcome = outcome_of(mapping, policy, workloads, &mut holders);
        if let Outcome::Forward(forward) = &outcome {
            plan.forwards.push(*forward);
        }
        plan.verdicts.push((mapping.clone(), outcome));
    }
    plan
}

/// Takes out of `plan` every forward whose public port a socket of the node listens on (see
/// [`listeners::blocking`]). Pure.
pub fn exclude_listened(
    plan: &mut ForwardingPlan,
    listening: &BTreeSet<Listener>,
    public: Ipv4Addr,
) {
    for (_, outcome) in &mut plan.verdicts {
        if let Outcome::Forward(forward) = outcome
            && let Some(listener) =
                listeners::blocking(listening, forward.protocol, forward.public_port, public)
        {
            *outcome = Outcome::HostListening(*listener);
        }
    }
    plan.forwards = plan
        .verdicts
        .iter()
        .filter_map(|(_, outcome)| match outcome {
            Outcome::Forward(forward) => Some(*forward),
            _ => None,
        })
        .collect();
}

fn outcome_of(
    mapping: &PortMapping,
    policy: &PortPolicy,
    workloads: &Workloads,
    holders: &mut BTreeMap<(Protocol, u16), String>,
) -> Outcome {
    if mapping.meta().deletion_timestamp.is_some() {
        return Outcome::Deleting;
    }
    let status = mapping.status.clone().unwrap_or_default();
    if !condition::is_true(&status.conditions, ACCEPTED) {
        return Outcome::NotAccepted;
    }
    let Some(target) = status.target.as_deref() else {
        return Outcome::WaitingForTarget;
    };
    let Ok(target) = target.parse::<SocketAddrV4>() else {
        return Outcome::InvalidTarget(format!(
            "status.target {target:?} is not an IPv4 address:port"
        ));
    };
    let Ok(public_port) = u16::try_from(mapping.spec.public_port) else {
        return Outcome::InvalidTarget(format!(
            "spec.publicPort {} is not a port",
            mapping.spec.public_port
        ));
    };
    if let Some(refusal) = policy.refusal(public_port) {
        return Outcome::Refused(refusal);
    }
    if let Err(why) = workloads.verify(
        &mapping.namespace().unwrap_or_default(),
        &mapping.spec.container,
        target,
        mapping.spec.private_port,
    ) {
        return Outcome::UnverifiedTarget(why);
    }
    let protocol = match mapping.spec.proto {
        uwsgi_it_api::Protocol::Tcp => Protocol::Tcp,
        uwsgi_it_api::Protocol::Udp => Protocol::Udp,
    };
    let forward = Forward::new(protocol, public_port, target);
    // Validated alone, so one bad mapping cannot stop the node's other forwards.
    if let Err(error) = ForwardingRuleset::new([], [], [forward]) {
        return Outcome::InvalidTarget(error.to_string());
    }
    let name = format!(
        "{}/{}",
        mapping.namespace().unwrap_or_default(),
        mapping.name_any()
    );
    match holders.get(&forward.key()) {
        Some(holder) => Outcome::Conflict {
            holder: holder.clone(),
        },
        None => {
            holders.insert(forward.key(), name);
            Outcome::Forward(forward)
        }
    }
}

/// The networks whose DNATed traffic is masqueraded (hairpin): the configured ones and the
/// Node's pod CIDRs. The forward targets themselves are always added by the ruleset.
pub fn container_networks(node: Option<&Node>, configured: &[Ipv4Cidr]) -> Vec<Ipv4Cidr> {
    let spec = node.and_then(|n| n.spec.as_ref());
    let pod_cidrs = spec
        .and_then(|s| s.pod_cidrs.clone())
        .unwrap_or_default()
        .into_iter()
        .chain(spec.and_then(|s| s.pod_cidr.clone()));
    configured
        .iter()
        .copied()
        .chain(pod_cidrs.filter_map(|text| text.parse().ok()))
        .collect()
}

/// What the loop remembers between syncs.
#[derive(Default)]
struct SyncState {
    /// The ruleset last written or confirmed in the kernel.
    last_applied: Option<ForwardingRuleset>,
}

/// Runs forever: an initial sync, then one per change and one per resync period.
pub(crate) async fn forwarding_loop(ctx: Arc<Context>) -> anyhow::Result<()> {
    let mut state = SyncState::default();
    let mut resync = tokio::time::interval(ctx.config.port_forward.resync_period);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate: it is the initial sync, a full one.
    loop {
        let full = tokio::select! {
            _ = resync.tick() => true,
            _ = ctx.triggers.forwarding.notified() => {
                tokio::time::sleep(DEBOUNCE).await;
                false
            }
        };
        sync_once(&ctx, &mut state, full).await;
    }
}

async fn public_address(ctx: &Context, node: Option<&Node>) -> Option<Ipv4Addr> {
    let server = ctx.caches.server.state().into_iter().next();
    if let Some(address) = declared_public_address(server.as_deref(), node) {
        return Some(address);
    }
    match discover_public_address(&ctx.netns).await {
        Ok(address) => address,
        Err(error) => {
            warn!(%error, "could not read the node's addresses through rtnetlink");
            None
        }
    }
}

async fn sync_once(ctx: &Context, state: &mut SyncState, full: bool) {
    let started = Instant::now();
    let mappings = Caches::mine(&ctx.caches.mappings, &ctx.node);
    let node = ctx.caches.node.state().into_iter().next();
    let containers = Caches::mine(&ctx.caches.containers, &ctx.node);
    let workloads = Workloads::new(&containers, &ctx.caches.pods.state(), &ctx.node);
    let mut plan = plan_forwards(&mappings, &ctx.config.port_policy, &workloads);
    let public = public_address(ctx, node.as_deref()).await;
    let networks = container_networks(node.as_deref(), &ctx.container_networks);
    if let Some(address) = public
        && !plan.forwards.is_empty()
    {
        let netns = ctx.netns.clone();
        match tokio::task::spawn_blocking(move || listeners::read(&netns)).await {
            Ok(Ok(listening)) => exclude_listened(&mut plan, &listening, address),
            Ok(Err(error)) => {
                // Without the node's sockets a new forward could take a service's port: keep
                // what is programmed and try again on the next sync.
                ctx.metrics.sync_failed(started.elapsed());
                warn!(%error, "could not read the node's listening sockets; the previous rules stay in place");
                let error = format!("could not read the node's listening sockets: {error}");
                report(ctx, state, &plan, public, Some(&error)).await;
                return;
            }
            Err(error) => {
                ctx.metrics.sync_failed(started.elapsed());
                let error = format!("could not read the node's listening sockets: {error}");
                warn!(%error, "the previous rules stay in place");
                report(ctx, state, &plan, public, Some(&error)).await;
                return;
            }
        }
    }

    let desired = match public {
        Some(address) => ForwardingRuleset::new([address], networks, plan.forwards.clone())
            .map_err(|e| e.to_string()),
        // Nothing to forward needs no address; anything else would be a guess.
        None if plan.forwards.is_empty() => {
            ForwardingRuleset::new([], networks, []).map_err(|e| e.to_string())
        }
        None => Err(format!(
            "node {} has no public address: no spec.address on its Server, no ExternalIP or InternalIP on its Node, and no global IPv4 address on the default route's interface",
            ctx.node,
        )),
    };

    let result = match desired {
        Ok(desired) if !full && state.last_applied.as_ref() == Some(&desired) => Ok(desired),
        Ok(desired) => apply(ctx, state, desired, full).await,
        Err(error) => Err(error),
    };
    match &result {
        Ok(applied) => {
            ctx.metrics
                .sync_succeeded(started.elapsed(), applied.forwards().len());
            state.last_applied = Some(applied.clone());
            ctx.ready.send_replace(true);
            ctx.health.succeeded();
        }
        Err(error) => {
            ctx.metrics.sync_failed(started.elapsed());
            warn!(%error, "forwarding sync failed; the previous rules stay in place");
        }
    }
    report(ctx, state, &plan, public, result.as_ref().err()).await;
}

async fn apply(
    ctx: &Context,
    state: &SyncState,
    desired: ForwardingRuleset,
    full: bool,
) -> Result<ForwardingRuleset, String> {
    let backend = ctx.backend.clone();
    let forward_accept = ctx.forward_accept.clone();
    let to_apply = desired.clone();
    let (report, accepted) = tokio::task::spawn_blocking(move || {
        let report = if full {
            backend.apply(&to_apply)
        } else {
            backend.apply_incremental(&to_apply)
        };
        let accepted = report
            .as_ref()
            .ok()
            .map(|_| forward_accept.ensure(to_apply.public_addresses(), full));
        (report, accepted)
    })
    .await
    .map_err(|e| format!("forwarding task failed: {e}"))?;
    let report = report.map_err(|e| e.to_string())?;
    match accepted {
        Some(Ok(true)) => {
            info!("accepted the forwarded connections in the filter table's FORWARD chain")
        }
        // No iptables on this host: no iptables FORWARD chain to open either.
        Some(Ok(false) | Err(ForwardingError::Spawn { .. })) | None => {}
        Some(Err(error)) => {
            warn!(%error, "could not accept the forwarded connections in the filter table's FORWARD chain; where its policy drops, forwards do not get through")
        }
    }
    if let Some(failure) = &report.incremental_failure {
        warn!(%failure, backend = ctx.backend.name(), "incremental forwarding update refused; inspected the whole table instead");
    }
    if report.rewritten {
        let mut difference = report.difference.clone().unwrap_or_default();
        let unchanged_on_our_side = state.last_applied.as_ref() == Some(&desired);
        if let Some(failure) = &report.incremental_failure {
            difference = format!("{difference}; the incremental update failed: {failure}");
        }
        if !report.incremental && (unchanged_on_our_side || report.incremental_failure.is_some()) {
            ctx.metrics.drift_repaired();
            warn!(%difference, backend = ctx.backend.name(), "forwarding rules drifted; rewrote them");
            if let Some(node) = ctx.caches.node.state().into_iter().next() {
                ctx.reporter
                    .warning(
                        &node.object_ref(&()),
                        "ForwardingDriftRepaired",
                        "RepairForwarding",
                        format!(
                            "the {} rules differed from the programmed ones ({difference}); rewrote them",
                            ctx.backend.name()
                        ),
                    )
                    .await;
            }
        } else {
            info!(
                forwards = report.forwards,
                incremental = report.incremental,
                %difference,
                duration = ?report.duration,
                backend = ctx.backend.name(),
                "forwarding rules written"
            );
        }
        for failure in &report.conntrack_failures {
            warn!(%failure, "conntrack cleanup failed; affected UDP flows recover when their entries expire");
        }
    }
    Ok(desired)
}

/// Reports `Programmed` on every mapping of the node. When the sync failed, forwards that the
/// kernel still holds from the last good sync stay `True`: a failed transaction changes nothing.
async fn report(
    ctx: &Context,
    state: &SyncState,
    plan: &ForwardingPlan,
    public: Option<Ipv4Addr>,
    failure: Option<&String>,
) {
    let conditions = plan.verdicts.iter().map(|(mapping, outcome)| {
        let condition = match (outcome, failure) {
            (Outcome::Forward(forward), Some(error)) => {
                let still_programmed = state.last_applied.as_ref().is_some_and(|r| {
                    r.target_of(forward.protocol, forward.public_port) == Some(forward.target)
                });
                if still_programmed {
                    outcome.condition(public)
                } else {
                    DesiredCondition::new(PROGRAMMED, false, "SyncFailed", error.clone())
                }
            }
            _ => outcome.condition(public),
        };
        (mapping.clone(), condition)
    });
    futures::stream::iter(conditions)
        .for_each_concurrent(8, |(mapping, condition)| async move {
            if let Err(error) = ctx
                .reporter
                .conditions(
                    mapping.as_ref(),
                    &[PROGRAMMED],
                    std::slice::from_ref(&condition),
                )
                .await
            {
                warn!(
                    %error,
                    mapping = %mapping.name_any(),
                    namespace = mapping.namespace().unwrap_or_default(),
                    "could not report Programmed"
                );
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use serde_json::json;

    /// A mapping of `acme/<container>` on node n1, private port 8000.
    fn mapping_of(
        container: &str,
        name: &str,
        created: i64,
        proto: &str,
        port: i32,
        target: Option<&str>,
    ) -> Arc<PortMapping> {
        let mut status = json!({
            "server": "n1",
            "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
        });
        if let Some(target) = target {
            status["target"] = json!(target);
        }
        let mut object: PortMapping = serde_json::from_value(json!({
            "apiVersion": "uwsgi.it/v1alpha1",
            "kind": "PortMapping",
            "metadata": {"name": name, "namespace": "acme"},
            "spec": {"container": container, "proto": proto, "publicPort": port, "privatePort": 8000},
            "status": status,
        }))
        .unwrap();
        object.metadata.creation_timestamp =
            Some(Time(jiff::Timestamp::from_second(created).unwrap()));
        Arc::new(object)
    }

    fn mapping(
        name: &str,
        created: i64,
        proto: &str,
        port: i32,
        target: Option<&str>,
    ) -> Arc<PortMapping> {
        mapping_of("hydra", name, created, proto, port, target)
    }

    /// Containers on n1 and their Pods: acme/hydra at 10.244.1.2, acme/medusa at 10.244.1.3,
    /// globex/victim at 10.244.1.9; acme/orphan has a Pod not owned by it; acme/faraway's
    /// Pod runs on another node.
    fn workloads() -> Workloads {
        let container = |ns: &str, name: &str| -> Arc<Container> {
            Arc::new(
                serde_json::from_value(json!({
                    "apiVersion": "uwsgi.it/v1alpha1", "kind": "Container",
                    "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}")},
                    "spec": {"server": "n1", "memory": 1, "storage": 1},
                }))
                .unwrap(),
            )
        };
        let pod = |ns: &str, name: &str, owner: &str, node: &str, ip: &str| -> Arc<Pod> {
            Arc::new(
                serde_json::from_value(json!({
                    "metadata": {"name": name, "namespace": ns, "ownerReferences": [{
                        "apiVersion": "uwsgi.it/v1alpha1", "kind": "Container", "name": name,
                        "uid": format!("uid-{owner}"), "controller": true}]},
                    "spec": {"nodeName": node, "containers": []},
                    "status": {"podIP": ip},
                }))
                .unwrap(),
            )
        };
        Workloads::new(
            &[
                container("acme", "hydra"),
                container("acme", "medusa"),
                container("globex", "victim"),
                container("acme", "orphan"),
                container("acme", "faraway"),
            ],
            &[
                pod("acme", "hydra", "hydra", "n1", "10.244.1.2"),
                pod("acme", "medusa", "medusa", "n1", "10.244.1.3"),
                pod("globex", "victim", "victim", "n1", "10.244.1.9"),
                pod("acme", "orphan", "someone-else", "n1", "10.244.1.4"),
                pod("acme", "faraway", "faraway", "n2", "10.244.2.5"),
            ],
            "n1",
        )
    }

    fn plan(mappings: &[Arc<PortMapping>]) -> ForwardingPlan {
        plan_forwards(mappings, &PortPolicy::default(), &workloads())
    }

    #[test]
    fn the_earlier_mapping_keeps_a_port() {
        let plan = plan(&[
            mapping_of("medusa", "late", 20, "tcp", 9000, Some("10.244.1.3:8000")),
            mapping("early", 10, "tcp", 9000, Some("10.244.1.2:8000")),
            mapping_of("medusa", "udp", 30, "udp", 9000, Some("10.244.1.3:8000")),
        ]);
        assert_eq!(plan.forwards.len(), 2);
        assert_eq!(
            plan.forwards[0].target,
            "10.244.1.2:8000".parse().unwrap(),
            "{plan:?}"
        );
        let late = plan
            .verdicts
            .iter()
            .find(|(m, _)| m.name_any() == "late")
            .unwrap();
        assert_eq!(
            late.1,
            Outcome::Conflict {
                holder: "acme/early".into()
            }
        );
    }

    #[test]
    fn unusable_mappings_are_left_out_with_a_reason() {
        let plan = plan(&[
            mapping("no-target", 1, "tcp", 9000, None),
            mapping("loopback", 2, "tcp", 9001, Some("127.0.0.1:8000")),
            mapping("garbage", 3, "tcp", 9002, Some("hydra:8000")),
        ]);
        assert!(plan.forwards.is_empty());
        assert_eq!(plan.verdicts[0].1, Outcome::WaitingForTarget);
        assert!(matches!(plan.verdicts[1].1, Outcome::UnverifiedTarget(_)));
        assert!(matches!(plan.verdicts[2].1, Outcome::InvalidTarget(_)));
    }

    #[test]
    fn a_target_that_is_not_the_containers_own_pod_is_never_forwarded() {
        let cases = [
            // The cloud metadata service, a node address, another customer's Pod.
            (
                "hydra",
                "169.254.169.254:80",
                "is not the address of container hydra's Pod",
            ),
            (
                "hydra",
                "198.18.0.11:8000",
                "is not the address of container hydra's Pod",
            ),
            (
                "hydra",
                "10.244.1.9:8000",
                "is not the address of container hydra's Pod",
            ),
            // The right Pod, another port than the mapping's.
            (
                "hydra",
                "10.244.1.2:22",
                "is not the mapping's privatePort 8000",
            ),
            (
                "orphan",
                "10.244.1.4:8000",
                "is not container orphan's workload",
            ),
            ("faraway", "10.244.2.5:8000", "has no Pod on this node"),
            ("ghost", "10.244.1.2:8000", "is not on this node"),
        ];
        for (container, target, why) in cases {
            let plan = plan(&[mapping_of(container, "m", 1, "tcp", 9000, Some(target))]);
            assert!(plan.forwards.is_empty(), "{container} {target}");
            let condition = plan.verdicts[0].1.condition(None);
            assert_eq!(condition.reason, "TargetUnverified");
            assert!(condition.message.contains(why), "{target}: {condition:?}");
        }
        let plan = plan(&[mapping("m", 1, "tcp", 9000, Some("10.244.1.2:8000"))]);
        assert_eq!(plan.forwards.len(), 1);
    }

    #[test]
    fn reserved_and_out_of_range_ports_are_never_forwarded() {
        let plan = plan(&[
            mapping("apiserver", 1, "tcp", 6443, Some("10.244.1.2:8000")),
            mapping("vxlan", 2, "udp", 8472, Some("10.244.1.2:8000")),
            mapping("ssh", 3, "tcp", 22, Some("10.244.1.2:8000")),
            mapping("web", 4, "tcp", 9000, Some("10.244.1.2:8000")),
        ]);
        assert_eq!(plan.forwards.len(), 1, "{plan:?}");
        assert_eq!(plan.forwards[0].public_port, 9000);
        let reasons: Vec<_> = plan
            .verdicts
            .iter()
            .map(|(_, o)| o.condition(None).reason)
            .collect();
        assert_eq!(
            reasons,
            [
                "ReservedPort",
                "ReservedPort",
                "PortOutOfRange",
                "Programmed"
            ]
        );
    }

    #[test]
    fn a_port_the_node_listens_on_is_taken_out_of_the_plan() {
        let mut plan = plan(&[
            mapping("taken", 1, "tcp", 9000, Some("10.244.1.2:8000")),
            mapping("free", 2, "tcp", 9001, Some("10.244.1.2:8000")),
        ]);
        let listener = Listener {
            protocol: Protocol::Tcp,
            address: "0.0.0.0".parse().unwrap(),
            port: 9000,
        };
        exclude_listened(
            &mut plan,
            &BTreeSet::from([listener]),
            "203.0.113.10".parse().unwrap(),
        );
        assert_eq!(plan.forwards.len(), 1);
        assert_eq!(plan.forwards[0].public_port, 9001);
        assert_eq!(plan.verdicts[0].1, Outcome::HostListening(listener));
        let condition = plan.verdicts[0].1.condition(None);
        assert_eq!(condition.reason, "HostListening");
        assert!(
            condition.message.contains("tcp 0.0.0.0:9000"),
            "{condition:?}"
        );
    }

    #[test]
    fn pod_cidrs_of_the_node_are_masqueraded() {
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": "n1"},
            "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]},
        }))
        .unwrap();
        let networks = container_networks(Some(&node), &["10.9.0.0/16".parse().unwrap()]);
        assert!(networks.contains(&"10.244.1.0/24".parse().unwrap()));
        assert!(networks.contains(&"10.9.0.0/16".parse().unwrap()));
    }
}
