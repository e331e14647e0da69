//! GitOps health as the tools compute it, run on objects the tests read from the API server:
//!
//! - kstatus (`sigs.k8s.io/cli-utils`: Flux, Helm 4's `--wait`, kpt), the Go program
//!   `hack/kstatus` built by `hack/go-tool.sh kstatus` and found through `UWSGI_IT_KSTATUS`;
//! - Flux's `healthCheckExprs` as this project ships them (`health/flux/kustomization.yaml`),
//!   evaluated by Flux's own code (`hack/fluxhealth`, built by `hack/go-tool.sh fluxhealth`,
//!   found through `UWSGI_IT_FLUXHEALTH`);
//! - the Argo CD health check this project ships (`health/argocd/health.lua`), run by Lua 5.1
//!   (Argo CD's gopher-lua is a Lua 5.1) with the standard libraries Argo CD withholds from
//!   argocd-cm scripts removed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// What kstatus says of one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KStatus {
    /// `Kind`.
    pub kind: String,
    /// `namespace/name` (`/name` for a cluster-scoped object).
    pub object: String,
    /// `Current`, `InProgress`, `Failed`, `Terminating`, ...
    pub status: String,
    /// kstatus' message.
    pub message: String,
}

/// kstatus of each object, in order.
pub fn kstatus(objects: &[Value]) -> Result<Vec<KStatus>> {
    let binary = std::env::var_os("UWSGI_IT_KSTATUS")
        .map(PathBuf::from)
        .context("UWSGI_IT_KSTATUS is not set: run `export UWSGI_IT_KSTATUS=$(hack/go-tool.sh kstatus)` (hack/test.sh does)")?;
    let output = run(&binary, &[], &serde_json::to_vec(objects)?)?;
    output
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.splitn(4, '\t').collect();
            let [kind, object, status, message] = fields[..] else {
                bail!("kstatus printed {line:?}");
            };
            Ok(KStatus {
                kind: kind.into(),
                object: object.into(),
                status: status.into(),
                message: message.into(),
            })
        })
        .collect()
}

/// The shipped Flux Kustomization with the `healthCheckExprs` of every kind.
pub fn flux_health_checks() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../health/flux/kustomization.yaml")
}

/// What Flux's kustomize-controller says of each object (`Current`, `InProgress`, `Failed`;
/// `Unknown` while it has no status to evaluate) with the shipped `healthCheckExprs`, in order.
pub fn flux_health(objects: &[Value]) -> Result<Vec<String>> {
    let binary = std::env::var_os("UWSGI_IT_FLUXHEALTH")
        .map(PathBuf::from)
        .context("UWSGI_IT_FLUXHEALTH is not set: run `export UWSGI_IT_FLUXHEALTH=$(hack/go-tool.sh fluxhealth)` (hack/test.sh does)")?;
    let checks = flux_health_checks();
    let checks = checks.to_str().context("a path that is not UTF-8")?;
    let output = run(&binary, &[checks], &serde_json::to_vec(objects)?)?;
    output
        .lines()
        .map(|line| match line.splitn(4, '\t').collect::<Vec<_>>()[..] {
            [_, _, status, _] => Ok(status.to_string()),
            _ => bail!("fluxhealth printed {line:?}"),
        })
        .collect()
}

/// What the Argo CD health check says: its `status` and `message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgoHealth {
    /// `Healthy`, `Progressing`, `Degraded`, ...
    pub status: String,
    /// For a person.
    pub message: String,
}

/// The shipped Argo CD health check.
pub fn argo_health_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../health/argocd/health.lua")
}

/// Runs the Argo CD health check on `object` as Argo CD would: `obj` is the object (JSON null
/// is nil), the script's returned table is the health.
pub fn argo_health(object: &Value) -> Result<ArgoHealth> {
    let script = std::fs::read_to_string(argo_health_script()).context("reading health.lua")?;
    // Argo CD gives argocd-cm scripts only the base, table and package libraries (and a safe
    // os): the script must not need the others, so they are taken away before it runs.
    let program = format!(
        "local write = io.write\n\
         obj = {}\n\
         string, io, os, debug, math = nil, nil, nil, nil, nil\n\
         local function check()\n{script}\nend\n\
         local hs = check()\n\
         write(tostring(hs.status), \"\\n\", tostring(hs.message))\n",
        lua_literal(object)
    );
    let output = run(Path::new("lua5.1"), &["-"], program.as_bytes())
        .context("lua5.1 (Debian package lua5.1, installed by hack/install-deps.sh)")?;
    let (status, message) = output.split_once('\n').unwrap_or((&output, ""));
    Ok(ArgoHealth {
        status: status.into(),
        message: message.into(),
    })
}

/// `value` as a Lua table constructor (what Argo CD's conversion of an object gives).
pub fn lua_literal(value: &Value) -> String {
    match value {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => lua_string(s),
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(lua_literal).collect();
            format!("{{{}}}", items.join(", "))
        }
        Value::Object(fields) => {
            let fields: Vec<String> = fields
                .iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| format!("[{}] = {}", lua_string(k), lua_literal(v)))
                .collect();
            format!("{{{}}}", fields.join(", "))
        }
    }
}

fn lua_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for byte in s.bytes() {
        match byte {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b' '..=b'~' => out.push(byte as char),
            // Lua 5.1 string escapes are decimal.
            other => out.push_str(&format!("\\{other}")),
        }
    }
    out.push('"');
    out
}

fn run(program: &Path, args: &[&str], stdin: &[u8]) -> Result<String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(stdin)
        .with_context(|| format!("writing to {}", program.display()))?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "{} failed ({}): {}",
            program.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8(output.stdout)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lua_literals_escape_what_lua_would_misread() {
        let value = serde_json::json!({"a": "say \"hi\"\n\\", "b": [1, true], "c": null});
        assert_eq!(
            lua_literal(&value),
            r#"{["a"] = "say \"hi\"\10\\", ["b"] = {1, true}}"#
        );
    }
}
