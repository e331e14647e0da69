//! The CustomDistro reconciler: acceptance against its storage container, `hostPath`,
//! `usedBy`, and a finalizer that refuses deletion while containers use the distro.

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;
use uwsgi_it_api::CustomDistro;
use uwsgi_it_api::condition::ACCEPTED;
use uwsgi_it_api::well_known::CONTROLLER_FINALIZER;
use uwsgi_it_domain::distro::{ContainerFacts, accept_distro, check_deletion, used_by};

use crate::Error;
use crate::admission::AdmissionRecord;
use crate::context::Context;
use crate::facts::{container_facts, distro_facts, key_of};
use crate::status::{ADMISSION_MANAGER, Desired, apply_status};

fn namespace_facts(ctx: &Context, namespace: &str) -> Vec<ContainerFacts> {
    ctx.containers_in(namespace)
        .iter()
        .filter(|c| c.metadata.deletion_timestamp.is_none())
        .map(|c| {
            let record = AdmissionRecord::cached(c);
            container_facts(c, record.server.clone(), record.is_admitted())
        })
        .collect()
}

fn api(ctx: &Context, distro: &CustomDistro) -> Api<CustomDistro> {
    Api::namespaced(ctx.client.clone(), &distro.namespace().unwrap_or_default())
}

async fn set_finalizers(
    ctx: &Context,
    distro: &CustomDistro,
    finalizers: Vec<String>,
) -> Result<(), Error> {
    let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": distro.resource_version()}});
    api(ctx, distro)
        .patch(
            &distro.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    Ok(())
}

/// Reconciles one CustomDistro.
pub async fn reconcile(distro: Arc<CustomDistro>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started("customdistro");
    ctx.wait_synced().await;
    let namespace = distro.namespace().unwrap_or_default();
    let containers = namespace_facts(&ctx, &namespace);
    let facts = distro_facts(&distro);
    let users = used_by(&facts, &containers);
    let has_finalizer = distro
        .finalizers()
        .iter()
        .any(|f| f == CONTROLLER_FINALIZER);

    if distro.metadata.deletion_timestamp.is_some() {
        if !has_finalizer {
            return Ok(Action::await_change());
        }
        return match check_deletion(&key_of(distro.as_ref()), &facts, &containers) {
            Ok(()) => {
                let rest = distro
                    .finalizers()
                    .iter()
                    .filter(|f| *f != CONTROLLER_FINALIZER)
                    .cloned()
                    .collect();
                set_finalizers(&ctx, &distro, rest).await?;
                Ok(Action::await_change())
            }
            Err(refused) => {
                let condition = Desired::yes(ACCEPTED, "DeletionBlocked", refused.to_string());
                write_status(&ctx, &distro, None, None, users.len(), condition).await?;
                // The containers' changes requeue the distro; this is only a safety net.
                Ok(Action::requeue(Duration::from_secs(60)))
            }
        };
    }
    if !has_finalizer {
        let mut finalizers = distro.finalizers().to_vec();
        finalizers.push(CONTROLLER_FINALIZER.to_string());
        set_finalizers(&ctx, &distro, finalizers).await?;
    }

    let (server, host_path, condition) = match accept_distro(&facts, &containers) {
        Ok(accepted) => {
            let storage_uid = ctx
                .containers
                .get(&ObjectRef::new(&accepted.storage_container).within(&namespace))
                .and_then(|c| AdmissionRecord::cached(&c).uid)
                .and_then(|uid| u32::try_from(uid).ok());
            let host_path = storage_uid.and_then(|uid| {
                uwsgi_it_domain::paths::custom_distro_dir(
                    &ctx.config.home_root,
                    uid,
                    &distro.spec.path,
                )
                .ok()
                .map(|p| p.display().to_string())
            });
            let message = format!(
                "stored in container {} on server {}; usable by this customer's containers there",
                accepted.storage_container, accepted.server
            );
            (
                Some(accepted.server),
                host_path,
                Desired::yes(ACCEPTED, "Accepted", message),
            )
        }
        Err(refusal) => (
            None,
            None,
            Desired::no(ACCEPTED, refusal.reason(), refusal.to_string()),
        ),
    };
    write_status(&ctx, &distro, server, host_path, users.len(), condition).await?;
    Ok(Action::requeue(Duration::from_secs(300)))
}

async fn write_status(
    ctx: &Context,
    distro: &CustomDistro,
    server: Option<String>,
    host_path: Option<String>,
    used: usize,
    condition: Desired,
) -> Result<(), Error> {
    let current = distro.status.clone().unwrap_or_default();
    let used = used as i64;
    let server = server.or_else(|| {
        current
            .server
            .clone()
            .filter(|_| condition.reason == "DeletionBlocked")
    });
    let host_path = host_path.or_else(|| {
        current
            .host_path
            .clone()
            .filter(|_| condition.reason == "DeletionBlocked")
    });
    if condition.matches(&current.conditions, distro.metadata.generation)
        && current.server == server
        && current.host_path == host_path
        && current.used_by == used
    {
        return Ok(());
    }
    let mut body = json!({
        "usedBy": used,
        "conditions": [condition.to_condition(&current.conditions, distro.metadata.generation)],
    });
    if let Some(server) = &server {
        body["server"] = json!(server);
    }
    if let Some(path) = &host_path {
        body["hostPath"] = json!(path);
    }
    apply_status(&api(ctx, distro), distro, ADMISSION_MANAGER, body).await?;
    if !condition.same_verdict(&current.conditions) {
        ctx.publish(
            &distro.object_ref(&()),
            Event {
                type_: if condition.status && condition.reason == "Accepted" {
                    EventType::Normal
                } else {
                    EventType::Warning
                },
                reason: condition.reason.clone(),
                note: Some(condition.message.clone()),
                action: "Accept".into(),
                secondary: None,
            },
        )
        .await;
    }
    Ok(())
}
