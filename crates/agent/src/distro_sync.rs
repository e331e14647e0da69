//! CustomDistros: reports whether each accepted distro's directory exists in its storage
//! container's `distros/` (and is reached without a symlink). The customer fills that directory
//! in through the storage container, which the API does not see, so the periodic pass is what
//! notices a distro appearing.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use tracing::warn;
use uwsgi_it_api::condition::{self, ACCEPTED, AVAILABLE};
use uwsgi_it_api::{Container, CustomDistro};
use uwsgi_it_domain::paths;

use crate::Context;
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
            let desired = availability(&ctx, &distro).await;
            if let Err(error) = ctx
                .reporter
                .conditions(
                    distro.as_ref(),
                    &[AVAILABLE],
                    std::slice::from_ref(&desired),
                )
                .await
            {
                warn!(%error, distro = %distro.name_any(), "could not report Available");
            }
        }
    }
}

async fn availability(ctx: &Context, distro: &CustomDistro) -> DesiredCondition {
    let namespace = distro.namespace().unwrap_or_default();
    let storage = ctx
        .caches
        .containers
        .get(&ObjectRef::<Container>::new(&distro.spec.storage_container).within(&namespace));
    let storage_uid = storage
        .as_deref()
        .filter(|c| on_node(*c, &ctx.node))
        .and_then(|c| c.status.as_ref()?.uid)
        .and_then(|uid| u32::try_from(uid).ok());
    let Some(uid) = storage_uid else {
        return DesiredCondition::new(
            AVAILABLE,
            false,
            "Missing",
            format!(
                "storage container {} has no home on this node",
                distro.spec.storage_container
            ),
        );
    };
    let expected = match paths::custom_distro_dir(ctx.homes.root(), uid, &distro.spec.path) {
        Ok(path) => path,
        Err(error) => {
            return DesiredCondition::new(AVAILABLE, false, "InvalidPath", error.to_string());
        }
    };
    let homes = ctx.homes.clone();
    let name = distro.spec.path.clone();
    let checked = tokio::task::spawn_blocking(move || homes.custom_distro_available(uid, &name))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    match checked {
        Ok(true) => DesiredCondition::new(
            AVAILABLE,
            true,
            "Available",
            format!("{} exists", expected.display()),
        ),
        Ok(false) => match first_symlink(ctx.homes.root(), &expected) {
            Some(link) => DesiredCondition::new(
                AVAILABLE,
                false,
                "Symlink",
                format!("{} is a symbolic link; refusing it", link.display()),
            ),
            None => DesiredCondition::new(
                AVAILABLE,
                false,
                "Missing",
                format!(
                    "{} does not exist or is not a directory",
                    expected.display()
                ),
            ),
        },
        Err(error) => DesiredCondition::new(AVAILABLE, false, "CheckFailed", error),
    }
}

/// The first symlink on the way from `root` to `path`, to say why a distro was refused. Only a
/// diagnosis for the message: the decision itself was made without following any link.
fn first_symlink(root: &Path, path: &Path) -> Option<PathBuf> {
    let relative = path.strip_prefix(root).ok()?;
    let mut current = root.to_owned();
    for component in relative.components() {
        current.push(component);
        let metadata = std::fs::symlink_metadata(&current).ok()?;
        if metadata.file_type().is_symlink() {
            return Some(current);
        }
    }
    None
}
