//! The chart's alerts against the running system: the rules as `helm template` renders the
//! PrometheusRule, scrapes of the programs' `/metrics` recorded with their times, and
//! `hack/alertcheck` (Prometheus' own rule parser and PromQL engine, found through
//! `UWSGI_IT_ALERTCHECK`) saying which alerts would fire.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};

use crate::chart::{chart_dir, helm};

/// The rule groups of the chart's PrometheusRule (`spec`, as Prometheus reads a rule file),
/// rendered with `prometheusRule.enabled=true` and `sets` (more `--set` values).
pub fn chart_rules(sets: &[&str]) -> Result<String> {
    let helm = helm()?;
    let mut command = Command::new(&helm);
    command
        .args(["template", "uwsgi-it"])
        .arg(chart_dir())
        .args(["--show-only", "templates/prometheusrule.yaml"])
        .args(["--set", "prometheusRule.enabled=true"]);
    for set in sets {
        command.args(["--set", set]);
    }
    let output = command
        .output()
        .with_context(|| format!("running {}", helm.display()))?;
    if !output.status.success() {
        bail!(
            "helm template failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let rule: serde_json::Value = serde_saphyr::from_str(&String::from_utf8(output.stdout)?)
        .context("the PrometheusRule is YAML")?;
    Ok(serde_json::to_string(&rule["spec"])?)
}

/// One HTTP/1.1 `GET path` of a program at `address` (no client library, the connection closed
/// after it): the whole response, status line, headers and body.
pub async fn http_get_local(address: std::net::SocketAddr, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response)
}

/// `GET /metrics` of a program at `address`: the body of a 200.
pub async fn scrape(address: std::net::SocketAddr) -> Result<String> {
    let response = http_get_local(address, "/metrics").await?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("not an HTTP response")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET /metrics: {head}");
    }
    Ok(body.to_owned())
}

/// Scrapes recorded for one evaluation: each is the text of a `/metrics` and when it was read.
pub struct Scrapes {
    dir: tempfile::TempDir,
    count: usize,
}

impl Scrapes {
    /// An empty record.
    pub fn new() -> Result<Scrapes> {
        Ok(Scrapes {
            dir: tempfile::Builder::new()
                .prefix("uwsgi-it-scrapes")
                .tempdir()?,
            count: 0,
        })
    }

    /// Records `text`, scraped now. Scrapes of several programs at the same time are one
    /// scrape of each target: they are kept apart by `target` (a label value in the file name).
    pub fn record(&mut self, target: &str, text: &str) -> Result<SystemTime> {
        let at = SystemTime::now();
        let since = at.duration_since(UNIX_EPOCH)?;
        self.count += 1;
        let dir = self.dir.path().join(target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join(format!(
                "{}.{:03}.prom",
                since.as_secs(),
                since.subsec_millis()
            )),
            text,
        )?;
        Ok(at)
    }

    /// Which alerts of `rules` (a rule file) would fire at `at`: alert name → fires.
    pub fn evaluate(&self, rules: &str, at: SystemTime) -> Result<BTreeMap<String, bool>> {
        let binary = std::env::var_os("UWSGI_IT_ALERTCHECK").map(PathBuf::from).context(
            "UWSGI_IT_ALERTCHECK is not set: run `export UWSGI_IT_ALERTCHECK=$(hack/go-tool.sh alertcheck)` (hack/test.sh does)",
        )?;
        let rules_file = self.dir.path().join("rules.yaml");
        std::fs::write(&rules_file, rules)?;
        let at = at.duration_since(UNIX_EPOCH)?.as_secs_f64();
        let mut command = Command::new(&binary);
        command
            .arg("-rules")
            .arg(&rules_file)
            .arg("-at")
            .arg(format!("{at:.3}"));
        for entry in std::fs::read_dir(self.dir.path())? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                command.arg("-scrapes").arg(entry.path());
            }
        }
        let output = command
            .output()
            .with_context(|| format!("running {}", binary.display()))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            bail!(
                "alertcheck failed ({}): {}{stdout}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(stdout
            .lines()
            .filter_map(|line| {
                let rest = line.strip_prefix("ALERT ")?;
                let (name, state) = rest.rsplit_once(' ')?;
                Some((name.to_owned(), state == "fires"))
            })
            .collect())
    }

    /// How many scrapes are recorded.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}
