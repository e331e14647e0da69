//! The Helm chart as tests and the local run use it: the pinned helm binary and the chart's
//! ServiceAccounts and RBAC, rendered the way `helm install` would render them.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};

/// Environment variable naming a helm binary to use instead of `hack/helm.sh`'s.
pub const HELM_ENV: &str = "UWSGI_IT_HELM";

/// Templates holding the chart's ServiceAccounts and RBAC (the customer role included).
const RBAC_TEMPLATES: [&str; 5] = [
    "serviceaccounts",
    "rbac-controller",
    "rbac-agent",
    "rbac-customer",
    "rbac-supplier",
];

/// A path inside the repository.
pub fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(relative)
}

/// The chart directory.
pub fn chart_dir() -> PathBuf {
    repo_path("charts/uwsgi-it-operator")
}

/// The helm binary: `UWSGI_IT_HELM`, else what `hack/helm.sh` builds (once) or finds in its
/// cache.
pub fn helm() -> Result<PathBuf> {
    static HELM: OnceLock<PathBuf> = OnceLock::new();
    if let Some(helm) = HELM.get() {
        return Ok(helm.clone());
    }
    let helm = match std::env::var_os(HELM_ENV) {
        Some(path) => PathBuf::from(path),
        None => {
            let script = repo_path("hack/helm.sh");
            let output = Command::new("bash")
                .arg(&script)
                .stderr(Stdio::inherit())
                .output()
                .with_context(|| format!("running {}", script.display()))?;
            if !output.status.success() {
                bail!("{} failed with {}", script.display(), output.status);
            }
            PathBuf::from(String::from_utf8(output.stdout)?.trim())
        }
    };
    Ok(HELM.get_or_init(|| helm).clone())
}

/// The chart's ServiceAccounts, ClusterRoles, Roles and bindings for `release` in `namespace`,
/// as multi-document YAML.
pub fn render_rbac(release: &str, namespace: &str) -> Result<String> {
    let helm = helm()?;
    let mut command = Command::new(&helm);
    command
        .args(["template", release])
        .arg(chart_dir())
        .args(["--namespace", namespace]);
    for template in RBAC_TEMPLATES {
        command.args(["--show-only", &format!("templates/{template}.yaml")]);
    }
    let output = command
        .output()
        .with_context(|| format!("running {}", helm.display()))?;
    if !output.status.success() {
        bail!(
            "helm template failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8(output.stdout)?)
}
