//! CustomDistros: the agent makes each accepted distro's tree under the storage container's
//! root-owned `<homeRoot>/.distros/<uid>/` and reports what it holds (`status.root`, condition
//! `Available`): the top-level directories a container running on it mounts, and its uWSGI. The
//! customer fills the tree through the storage container, which the API does not see, so the
//! periodic pass is what notices a distro becoming usable (or broken).

use std::sync::Arc;

use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use serde_json::json;
use tracing::warn;
use uwsgi_it_api::condition::{self, ACCEPTED, AVAILABLE};
use uwsgi_it_api::{Container, CustomDistro, DistroRoot};
use uwsgi_it_domain::distro::EMPEROR_CANDIDATES;

use crate::Context;
use crate::homes::HomeError;
use crate::reporter::DesiredCondition;
use crate::scope::{Caches, on_node};

pub(crate) async fn distros_loop(ctx: Arc<Context>) -> anyhow::Result<()> {
    let mut resync = tokio::time::interval(ctx.config.port_forward.resync_period);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = resync.tick() => {}
            _ = ctx.triggers.distros.notified() => {}
        }
        for distro in Caches::mine(&ctx.caches.distros, &ctx.node) {
            let accepted = distro
                .status
                .as_ref()
                .is_some_and(|s| condition::is_true(&s.conditions, ACCEPTED));
            if !accepted {
                continue;
            }
            let (desired, root) = availability(&ctx, &distro).await;
            let current = distro.status.as_ref().and_then(|s| s.root.as_ref());
            let mut fields = serde_json::Map::new();
            if let Some(root) = &root {
                fields.insert("root".into(), json!(root));
            }
            if let Err(error) = ctx
                .reporter
                .status(
                    distro.as_ref(),
                    &[AVAILABLE],
                    std::slice::from_ref(&desired),
                    fields,
                    current == root.as_ref(),
                )
                .await
            {
                warn!(%error, distro = %distro.name_any(), "could not report Available");
            }
        }
    }
}

async fn availability(
    ctx: &Context,
    distro: &CustomDistro,
) -> (DesiredCondition, Option<DistroRoot>) {
    let namespace = distro.namespace().unwrap_or_default();
    let storage = ctx
        .caches
        .containers
        .get(&ObjectRef::<Container>::new(&distro.spec.storage_container).within(&namespace));
    let storage_uid = storage
        .as_deref()
        .filter(|c| on_node(*c, &ctx.node) && c.spec.custom_distros_storage)
        .and_then(|c| c.status.as_ref()?.uid)
        .and_then(|uid| u32::try_from(uid).ok());
    let Some(uid) = storage_uid else {
        let why = format!(
            "storage container {} has no home on this node",
            distro.spec.storage_container
        );
        return (
            DesiredCondition::new(AVAILABLE, false, "Missing", why),
            None,
        );
    };
    let homes = ctx.homes.clone();
    let name = distro.spec.path.clone();
    let surveyed = tokio::task::spawn_blocking(move || homes.ensure_distro_tree(uid, &name))
        .await
        .map_err(|e| e.to_string());
    // Where the customer sees the tree: its home is /containers/<uid> inside its Pod.
    let seen_as = format!(
        "/containers/{uid}/distros/{} in storage container {}",
        distro.spec.path, distro.spec.storage_container
    );
    let refused = |reason: &str, message: String| {
        (
            DesiredCondition::new(AVAILABLE, false, reason, message),
            None,
        )
    };
    match surveyed {
        Ok(Ok(survey)) => match survey.emperor {
            Some(emperor) => {
                let mut message = format!(
                    "{}: {} top-level directories ({}), uWSGI at {emperor}",
                    survey.tree.display(),
                    survey.directories.len(),
                    survey.directories.join(", ")
                );
                if !survey.skipped.is_empty() {
                    message.push_str(&format!("; not mounted: {}", survey.skipped.join(", ")));
                }
                (
                    DesiredCondition::new(AVAILABLE, true, "Available", message),
                    Some(DistroRoot {
                        directories: survey.directories,
                        emperor,
                    }),
                )
            }
            None if survey.directories.is_empty() => refused(
                "Empty",
                format!(
                    "{} is empty: fill it with a root filesystem from {seen_as}",
                    survey.tree.display()
                ),
            ),
            None => {
                let mut message = format!(
                    "{} has no uWSGI: none of {} is an executable file (for all users) inside it; install one from {seen_as}",
                    survey.tree.display(),
                    EMPEROR_CANDIDATES.join(", ")
                );
                if !survey.skipped.is_empty() {
                    message.push_str(&format!("; not mounted: {}", survey.skipped.join(", ")));
                }
                refused("NoUwsgi", message)
            }
        },
        Ok(Err(error)) => {
            let reason = match &error {
                HomeError::Symlink { .. } => "Symlink",
                HomeError::NotADirectory { .. } => "NotADirectory",
                HomeError::NotOwned { .. } => "NotOwned",
                HomeError::NotFound { .. } => "Missing",
                HomeError::Path(_) => "InvalidPath",
                _ => "CheckFailed",
            };
            refused(reason, error.to_string())
        }
        Err(error) => refused("CheckFailed", error),
    }
}
