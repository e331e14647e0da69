//! The Customer reconciler: the customer's namespace, the RoleBinding that lets its users act
//! there, the ClusterRole that lets them read their Customer and the Servers only they own, its
//! per-server usage, and a finalizer that keeps it while it has containers.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, RoleBinding};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;
use uwsgi_it_api::condition::READY;
use uwsgi_it_api::well_known::{CONTROLLER_FINALIZER, CUSTOMER_LABEL};
use uwsgi_it_api::{Customer, ResourceUsage, ServerUsage};

use crate::Error;
use crate::context::Context;
use crate::status::{ADMISSION_MANAGER, Desired, apply_status};
use crate::workload::MANAGED_BY;

/// Name of the RoleBinding the controller keeps in each customer namespace.
pub const ROLE_BINDING: &str = "uwsgi-it-customer";

fn api(ctx: &Context) -> Api<Customer> {
    Api::all(ctx.client.clone())
}

async fn set_finalizers(
    ctx: &Context,
    customer: &Customer,
    finalizers: Vec<String>,
) -> Result<(), Error> {
    let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": customer.resource_version()}});
    api(ctx)
        .patch(
            &customer.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    Ok(())
}

/// Reconciles one Customer.
pub async fn reconcile(customer: Arc<Customer>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started("customer");
    ctx.wait_synced().await;
    let namespace = customer.namespace_name();
    let containers = ctx.containers_in(&namespace);
    let has_finalizer = customer
        .finalizers()
        .iter()
        .any(|f| f == CONTROLLER_FINALIZER);

    if customer.metadata.deletion_timestamp.is_some() {
        if !has_finalizer {
            return Ok(Action::await_change());
        }
        if containers.is_empty() {
            let rest = customer
                .finalizers()
                .iter()
                .filter(|f| *f != CONTROLLER_FINALIZER)
                .cloned()
                .collect();
            set_finalizers(&ctx, &customer, rest).await?;
            return Ok(Action::await_change());
        }
        let mut names: Vec<String> = containers.iter().map(|c| c.name_any()).collect();
        names.sort();
        let message = format!(
            "deletion waits for {} container(s) in namespace {namespace}: {}; delete them first",
            names.len(),
            names.join(", ")
        );
        write_status(
            &ctx,
            &customer,
            &namespace,
            Desired::no(READY, "HasContainers", message),
        )
        .await?;
        return Ok(Action::requeue(Duration::from_secs(60)));
    }
    if !has_finalizer {
        let mut finalizers = customer.finalizers().to_vec();
        finalizers.push(CONTROLLER_FINALIZER.to_string());
        set_finalizers(&ctx, &customer, finalizers).await?;
    }

    // A namespace belongs to the earliest Customer claiming it, and never to a Customer when
    // it exists without being one's (kube-system, a supplier's own): taking it over would hand
    // its Pods and Secrets to the customer's users.
    if let Some(refusal) = claim_refusal(&ctx, &customer, &namespace).await? {
        write_status(&ctx, &customer, &namespace, refusal).await?;
        return Ok(Action::requeue(Duration::from_secs(300)));
    }

    // A Customer is reconciled on every change of its containers (its usage); its namespace and
    // bindings depend only on its spec and on which of its servers other Customers list, so they
    // are applied when one of those changes (and again after REAPPLY, which repairs drift such
    // as a deleted RoleBinding).
    let uid = customer.metadata.uid.clone().unwrap_or_default();
    let servers = sole_owned_servers(&customer, &ctx.customers.state(), |name| {
        ctx.servers.get(&ObjectRef::new(name)).map(|server| {
            server
                .status
                .iter()
                .flat_map(|s| s.ledger.iter().map(|e| e.namespace.clone()))
                .collect()
        })
    });
    let applied = ctx
        .customer_applied
        .lock()
        .expect("customer applied map")
        .get(&uid)
        .is_some_and(|applied| {
            applied.generation == customer.metadata.generation
                && applied.sole_owned == servers
                && applied.at.elapsed() < REAPPLY
        });
    if !applied {
        apply_namespace_and_binding(&ctx, &customer, &namespace, &servers).await?;
        ctx.customer_applied
            .lock()
            .expect("customer applied map")
            .insert(
                uid,
                crate::context::CustomerApplied {
                    generation: customer.metadata.generation,
                    sole_owned: servers,
                    at: std::time::Instant::now(),
                },
            );
    }

    let ready = Desired::yes(
        READY,
        "Ready",
        format!(
            "namespace {namespace} with {} user(s) and {} group(s) bound to {}",
            customer.spec.users.len(),
            customer.spec.groups.len(),
            ctx.config.customer_cluster_role
        ),
    );
    write_status(&ctx, &customer, &namespace, ready).await?;
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// Why `customer` may not have `namespace`, if it may not.
async fn claim_refusal(
    ctx: &Context,
    customer: &Customer,
    namespace: &str,
) -> Result<Option<Desired>, Error> {
    let me = crate::facts::key_of(customer);
    let earlier = ctx
        .customers
        .state()
        .iter()
        .filter(|c| c.namespace_name() == namespace && c.metadata.deletion_timestamp.is_none())
        .filter(|c| c.metadata.uid != customer.metadata.uid)
        .map(|c| crate::facts::key_of(c.as_ref()))
        .filter(|key| *key < me)
        .min();
    if let Some(first) = earlier {
        return Ok(Some(Desired::no(
            READY,
            "NamespaceClaimed",
            format!(
                "namespace {namespace} belongs to Customer {}, which claimed it first; give this Customer another spec.namespace",
                first.name
            ),
        )));
    }
    let namespaces: Api<Namespace> = Api::all(ctx.client.clone());
    let Some(existing) = namespaces.get_opt(namespace).await? else {
        return Ok(None);
    };
    match existing.labels().get(CUSTOMER_LABEL) {
        Some(owner) if *owner == customer.name_any() => Ok(None),
        Some(owner) => Ok(Some(Desired::no(
            READY,
            "NamespaceClaimed",
            format!("namespace {namespace} belongs to Customer {owner}"),
        ))),
        None => Ok(Some(Desired::no(
            READY,
            "NamespaceNotCustomers",
            format!(
                "namespace {namespace} exists and is not a customer namespace (no {CUSTOMER_LABEL} label); \
                 it is never taken over: give this Customer another spec.namespace"
            ),
        ))),
    }
}

/// The NetworkPolicy of every customer namespace.
pub const ISOLATION_POLICY: &str = "uwsgi-it-isolation";

/// Pod Security on customer namespaces: `baseline` enforced (a custom distro's Pod needs no
/// more, a platform one meets `restricted`), `restricted` warned and audited.
const POD_SECURITY_LABELS: [(&str, &str); 4] = [
    ("pod-security.kubernetes.io/enforce", "baseline"),
    ("pod-security.kubernetes.io/enforce-version", "latest"),
    ("pod-security.kubernetes.io/warn", "restricted"),
    ("pod-security.kubernetes.io/audit", "restricted"),
];

/// The customer namespace's NetworkPolicy: its Pods accept connections from the namespace's own
/// Pods, from namespaces that are no customer's (the supplier's monitoring, ingress), and from
/// any address outside `podNetworks` (clients through the public forwards keep their address);
/// so never from another customer's Pods. Egress is open: customers' apps reach the Internet,
/// and another customer's Pods refuse them by their own policy.
pub fn isolation_policy(
    namespace: &str,
    customer: &str,
    pod_networks: &[String],
) -> serde_json::Value {
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": ISOLATION_POLICY,
            "namespace": namespace,
            "labels": {CUSTOMER_LABEL: customer, MANAGED_BY.0: MANAGED_BY.1},
        },
        "spec": {
            "podSelector": {},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [
                {"podSelector": {}},
                {"namespaceSelector": {"matchExpressions": [{"key": CUSTOMER_LABEL, "operator": "DoesNotExist"}]}},
                {"ipBlock": {"cidr": "0.0.0.0/0", "except": pod_networks}},
            ]}],
        },
    })
}

/// How long an applied namespace and RoleBinding are trusted before they are applied again.
const REAPPLY: Duration = Duration::from_secs(60);

async fn apply_namespace_and_binding(
    ctx: &Context,
    customer: &Customer,
    namespace: &str,
    sole_owned: &[String],
) -> Result<(), Error> {
    let manager = PatchParams::apply(ADMISSION_MANAGER).force();
    let namespaces: Api<Namespace> = Api::all(ctx.client.clone());
    let mut labels = serde_json::Map::new();
    labels.insert(CUSTOMER_LABEL.into(), json!(customer.name_any()));
    labels.insert(MANAGED_BY.0.into(), json!(MANAGED_BY.1));
    for (key, value) in POD_SECURITY_LABELS {
        labels.insert(key.into(), json!(value));
    }
    let ns = json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": namespace, "labels": labels},
    });
    namespaces
        .patch(namespace, &manager, &Patch::Apply(&ns))
        .await?;
    let networks: Vec<String> = ctx
        .config
        .pod_networks
        .iter()
        .map(ToString::to_string)
        .collect();
    let policy = isolation_policy(namespace, &customer.name_any(), &networks);
    Api::<NetworkPolicy>::namespaced(ctx.client.clone(), namespace)
        .patch(ISOLATION_POLICY, &manager, &Patch::Apply(&policy))
        .await?;

    let subjects: Vec<_> =
        customer
            .spec
            .users
            .iter()
            .map(|u| json!({"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": u}))
            .chain(customer.spec.groups.iter().map(
                |g| json!({"kind": "Group", "apiGroup": "rbac.authorization.k8s.io", "name": g}),
            ))
            .collect();
    let binding = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {
            "name": ROLE_BINDING,
            "namespace": namespace,
            "labels": {CUSTOMER_LABEL: customer.name_any(), MANAGED_BY.0: MANAGED_BY.1},
        },
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": ctx.config.customer_cluster_role},
        "subjects": subjects,
    });
    let bindings: Api<RoleBinding> = Api::namespaced(ctx.client.clone(), namespace);
    bindings
        .patch(ROLE_BINDING, &manager, &Patch::Apply(&binding))
        .await?;

    let (role, binding) = reader_objects(customer, sole_owned, &subjects);
    let name = reader_name(&customer.name_any());
    Api::<ClusterRole>::all(ctx.client.clone())
        .patch(&name, &manager, &Patch::Apply(&role))
        .await?;
    Api::<ClusterRoleBinding>::all(ctx.client.clone())
        .patch(&name, &manager, &Patch::Apply(&binding))
        .await?;
    Ok(())
}

/// Prefix of the ClusterRole and ClusterRoleBinding of each Customer (see [`reader_name`]); the
/// configuration refuses a `customerClusterRole` that starts with it.
pub use uwsgi_it_domain::config::CUSTOMER_READER_PREFIX as READER_PREFIX;

/// The ClusterRole (and its ClusterRoleBinding) that lets a Customer's users read their own
/// Customer (its status holds the usage of each of its servers) and the Servers only they own.
/// Cluster-scoped objects cannot be granted by the namespace's RoleBinding, and a ClusterRole
/// without `resourceNames` would show every customer's.
pub fn reader_name(customer: &str) -> String {
    format!("{READER_PREFIX}{customer}")
}

/// The servers of `customer` that it alone can see into: no other Customer lists it (one being
/// deleted still counts, its containers may still be there) and every entry of its ledger is a
/// container of the customer's own namespace. A shared Server's ledger names the other
/// customers' containers, so only a sole owner may read it (its usage is in the Customer's own
/// status either way). `ledger_namespaces` gives the namespaces of a Server's ledger entries,
/// `None` when the Server is unknown (nothing to read: no grant).
pub fn sole_owned_servers(
    customer: &Customer,
    customers: &[Arc<Customer>],
    ledger_namespaces: impl Fn(&str) -> Option<Vec<String>>,
) -> Vec<String> {
    let namespace = customer.namespace_name();
    let mut servers: Vec<String> = customer
        .spec
        .servers
        .iter()
        .filter(|server| {
            !customers.iter().any(|other| {
                other.metadata.uid != customer.metadata.uid && other.spec.servers.contains(server)
            })
        })
        .filter(|server| {
            ledger_namespaces(server)
                .is_some_and(|namespaces| namespaces.iter().all(|n| *n == namespace))
        })
        .cloned()
        .collect();
    servers.sort();
    servers.dedup();
    servers
}

/// The reader ClusterRole and ClusterRoleBinding of `customer` (owned by it: they go with it).
pub fn reader_objects(
    customer: &Customer,
    servers: &[String],
    subjects: &[serde_json::Value],
) -> (serde_json::Value, serde_json::Value) {
    let name = reader_name(&customer.name_any());
    let owner = json!([{
        "apiVersion": "uwsgi.it/v1alpha1",
        "kind": "Customer",
        "name": customer.name_any(),
        "uid": customer.metadata.uid.clone().unwrap_or_default(),
        "controller": true,
    }]);
    let labels = json!({CUSTOMER_LABEL: customer.name_any(), MANAGED_BY.0: MANAGED_BY.1});
    let mut rules = vec![json!({
        "apiGroups": ["uwsgi.it"],
        "resources": ["customers"],
        "verbs": ["get", "watch"],
        "resourceNames": [customer.name_any()],
    })];
    if !servers.is_empty() {
        rules.push(json!({
            "apiGroups": ["uwsgi.it"],
            "resources": ["servers"],
            "verbs": ["get", "watch"],
            "resourceNames": servers,
        }));
    }
    let role = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name, "labels": labels, "ownerReferences": owner},
        "rules": rules,
    });
    let binding = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": name, "labels": labels, "ownerReferences": owner},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": subjects,
    });
    (role, binding)
}

/// Usage of every server the customer owns: capacity, everyone's reservations, what is free
/// (from the Server's ledger), and how many of the customer's containers hold a reservation
/// there.
fn usage(ctx: &Context, customer: &Customer, namespace: &str) -> Vec<ServerUsage> {
    let mut servers = customer.spec.servers.clone();
    servers.sort();
    servers.dedup();
    servers
        .into_iter()
        .map(|name| {
            let server = ctx.servers.get(&ObjectRef::new(&name));
            let status = server.as_ref().and_then(|s| s.status.as_ref());
            let resource = |capacity: Option<i64>, used: Option<i64>| {
                let capacity = capacity.unwrap_or(0);
                let used = used.unwrap_or(0);
                ResourceUsage {
                    capacity,
                    used,
                    free: (capacity - used).max(0),
                }
            };
            ServerUsage {
                address: status.and_then(|s| s.address.clone()),
                memory: resource(
                    server.as_ref().map(|s| s.spec.memory),
                    status.and_then(|s| s.memory.as_ref()).map(|m| m.reserved),
                ),
                storage: resource(
                    server.as_ref().map(|s| s.spec.storage),
                    status.and_then(|s| s.storage.as_ref()).map(|m| m.reserved),
                ),
                containers: status.map_or(0, |s| {
                    s.ledger.iter().filter(|e| e.namespace == namespace).count() as i64
                }),
                name,
            }
        })
        .collect()
}

async fn write_status(
    ctx: &Context,
    customer: &Customer,
    namespace: &str,
    ready: Desired,
) -> Result<(), Error> {
    let current = customer.status.clone().unwrap_or_default();
    let servers = usage(ctx, customer, namespace);
    let summary = crate::readiness::own(&ready, uwsgi_it_api::readiness::customer_stalled);
    if crate::readiness::shows(&current.conditions, &summary, customer.metadata.generation)
        && current.namespace.as_deref() == Some(namespace)
        && current.servers == servers
        && current.observed_generation == customer.metadata.generation
    {
        return Ok(());
    }
    let body = json!({
        "namespace": namespace,
        "servers": servers,
        "observedGeneration": customer.metadata.generation,
        "conditions": crate::readiness::conditions(&current.conditions, &summary, customer.metadata.generation),
    });
    apply_status(&api(ctx), customer, ADMISSION_MANAGER, body).await?;
    if !ready.same_verdict(&current.conditions) {
        ctx.publish(
            &customer.object_ref(&()),
            Event {
                type_: if ready.status {
                    EventType::Normal
                } else {
                    EventType::Warning
                },
                reason: ready.reason.clone(),
                note: Some(ready.message.clone()),
                action: "Reconcile".into(),
                secondary: None,
            },
        )
        .await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use uwsgi_it_api::CustomerSpec;

    fn customer(name: &str, uid: &str, servers: &[&str]) -> Arc<Customer> {
        let mut c = Customer::new(
            name,
            CustomerSpec {
                servers: servers.iter().map(ToString::to_string).collect(),
                ..Default::default()
            },
        );
        c.metadata.uid = Some(uid.into());
        Arc::new(c)
    }

    fn ledgers<'a>(
        entries: &'a [(&'a str, &'a [&'a str])],
    ) -> impl Fn(&str) -> Option<Vec<String>> + 'a {
        move |server| {
            entries
                .iter()
                .find(|(name, _)| *name == server)
                .map(|(_, namespaces)| namespaces.iter().map(ToString::to_string).collect())
        }
    }

    #[test]
    fn a_server_listed_by_another_customer_is_not_readable() {
        let acme = customer("acme", "1", &["s1", "s2"]);
        let other = customer("other", "2", &["s2"]);
        let all = [acme.clone(), other];
        let servers = sole_owned_servers(&acme, &all, ledgers(&[("s1", &[]), ("s2", &[])]));
        assert_eq!(servers, ["s1"]);
    }

    #[test]
    fn a_customer_being_deleted_still_shares_its_servers() {
        let acme = customer("acme", "1", &["s1"]);
        let mut leaving = (*customer("leaving", "2", &["s1"])).clone();
        leaving.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        let all = [acme.clone(), Arc::new(leaving)];
        assert!(sole_owned_servers(&acme, &all, ledgers(&[("s1", &[])])).is_empty());
    }

    #[test]
    fn a_ledger_naming_another_namespace_is_not_readable() {
        // The server was shared until just now: the other customer's containers are still
        // in its ledger.
        let acme = customer("acme", "1", &["s1", "s2"]);
        let all = [acme.clone()];
        let servers = sole_owned_servers(
            &acme,
            &all,
            ledgers(&[("s1", &["acme", "acme"]), ("s2", &["acme", "other"])]),
        );
        assert_eq!(servers, ["s1"]);
    }

    #[test]
    fn an_unknown_server_is_not_granted() {
        let acme = customer("acme", "1", &["s1", "ghost"]);
        let all = [acme.clone()];
        assert_eq!(
            sole_owned_servers(&acme, &all, ledgers(&[("s1", &[])])),
            ["s1"]
        );
    }
}
