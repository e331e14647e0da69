//! `uwsgi-it-operator crds --apply DIR`: keeps the operator's CRDs current on `helm upgrade`.
//!
//! Helm installs a chart's `crds/` once and never upgrades them; the chart's pre-upgrade hook
//! runs this with the new chart's CRD files mounted at DIR (a ConfigMap made from `crds/`). Each
//! file must hold exactly one CustomResourceDefinition of this operator (group `uwsgi.it`, one of
//! the kinds this binary serves): the hook's RBAC could write any CRD, this code writes only
//! ours. Each is written whole (a replace at the revision read, retried on a conflict), so a
//! field or column the new chart drops is dropped too, as `kubectl replace` would; then the run
//! waits until the API server serves it (`Established`).

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};

/// The API group every CRD applied here must belong to.
const GROUP: &str = "uwsgi.it";

/// Reads and checks the CRD files of `dir` (`*.yaml`, sorted by name).
pub fn read(dir: &Path) -> anyhow::Result<Vec<CustomResourceDefinition>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let texts = files
        .iter()
        .map(|path| {
            std::fs::read_to_string(path)
                .map(|text| (path.display().to_string(), text))
                .with_context(|| format!("reading {}", path.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let known: BTreeSet<String> = uwsgi_it_api::crds()
        .into_iter()
        .filter_map(|crd| crd.metadata.name)
        .collect();
    parse(&texts, &known)
}

/// The CRDs of `files` (name, YAML text), each checked to be one of `known`.
pub fn parse(
    files: &[(String, String)],
    known: &BTreeSet<String>,
) -> anyhow::Result<Vec<CustomResourceDefinition>> {
    if files.is_empty() {
        bail!("no CRD files (*.yaml) to apply");
    }
    files
        .iter()
        .map(|(file, text)| {
            let crd: CustomResourceDefinition = serde_saphyr::from_str(text)
                .with_context(|| format!("{file}: not one CustomResourceDefinition"))?;
            let name = crd.metadata.name.clone().unwrap_or_default();
            if crd.spec.group != GROUP {
                bail!(
                    "{file}: CRD {name} is of group {:?}; only {GROUP} CRDs are applied",
                    crd.spec.group
                );
            }
            if !known.contains(&name) {
                bail!(
                    "{file}: CRD {name} is not one this operator serves ({})",
                    known.iter().cloned().collect::<Vec<_>>().join(", ")
                );
            }
            Ok(crd)
        })
        .collect()
}

/// Writes every CRD whole and waits until each is established.
pub async fn apply(
    client: kube::Client,
    crds: Vec<CustomResourceDefinition>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client);
    for crd in &crds {
        let name = crd.metadata.name.clone().unwrap_or_default();
        write(&api, crd)
            .await
            .with_context(|| format!("writing CRD {name}"))?;
    }
    let deadline = tokio::time::Instant::now() + timeout;
    for crd in &crds {
        let name = crd.metadata.name.clone().unwrap_or_default();
        loop {
            let current = api.get(&name).await?;
            if established(&current) {
                println!("CRD {name} applied and established");
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("CRD {name} is not established after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    Ok(())
}

async fn write(
    api: &Api<CustomResourceDefinition>,
    crd: &CustomResourceDefinition,
) -> anyhow::Result<()> {
    let name = crd.metadata.name.clone().unwrap_or_default();
    for _ in 0..10 {
        let result = match api.get_opt(&name).await? {
            None => api.create(&PostParams::default(), crd).await,
            Some(current) => {
                let mut next = crd.clone();
                // The live object's identity and labels stay (Helm's ownership labels, say);
                // the definition is the new chart's.
                next.metadata = current.metadata.clone();
                next.metadata.managed_fields = None;
                let labels = next.metadata.labels.get_or_insert_default();
                labels.extend(crd.metadata.labels.clone().unwrap_or_default());
                let annotations = next.metadata.annotations.get_or_insert_default();
                annotations.extend(crd.metadata.annotations.clone().unwrap_or_default());
                if current.spec == next.spec
                    && current.metadata.labels == next.metadata.labels
                    && current.metadata.annotations == next.metadata.annotations
                {
                    return Ok(());
                }
                api.replace(&name, &PostParams::default(), &next).await
            }
        };
        match result {
            Ok(_) => return Ok(()),
            // Someone wrote it in between: read it again.
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    bail!("CRD {name} kept changing while it was written (10 conflicts)")
}

fn established(crd: &CustomResourceDefinition) -> bool {
    crd.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known() -> BTreeSet<String> {
        ["servers.uwsgi.it".to_string()].into()
    }

    fn crd(group: &str, name: &str) -> String {
        format!(
            "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: {name}\nspec:\n  group: {group}\n  names: {{kind: Server, plural: servers}}\n  scope: Cluster\n  versions: []\n"
        )
    }

    #[test]
    fn the_operators_own_crds_are_read() {
        let crds = parse(
            &[("servers.yaml".into(), crd(GROUP, "servers.uwsgi.it"))],
            &known(),
        )
        .unwrap();
        assert_eq!(crds[0].metadata.name.as_deref(), Some("servers.uwsgi.it"));
    }

    #[test]
    fn a_crd_of_another_group_or_kind_is_refused() {
        let other_group = parse(
            &[("x.yaml".into(), crd("evil.example", "servers.evil.example"))],
            &known(),
        )
        .unwrap_err();
        assert!(
            other_group.to_string().contains("only uwsgi.it CRDs"),
            "{other_group}"
        );
        let other_kind = parse(
            &[("x.yaml".into(), crd(GROUP, "widgets.uwsgi.it"))],
            &known(),
        )
        .unwrap_err();
        assert!(
            other_kind
                .to_string()
                .contains("not one this operator serves"),
            "{other_kind}"
        );
        assert!(
            parse(&[], &known()).is_err(),
            "nothing to apply is an error"
        );
        assert!(
            parse(&[("x.yaml".into(), "kind: [".into())], &known()).is_err(),
            "not YAML"
        );
    }

    #[test]
    fn the_files_shipped_in_the_chart_are_accepted() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/uwsgi-it-operator/crds");
        let crds = read(&dir).unwrap();
        assert_eq!(crds.len(), uwsgi_it_api::crds().len());
    }
}
