//! The real cluster on this machine (tier 3): `hack/cluster.sh` brings up the control plane and
//! two real server nodes (kubelet, containerd, runc, CNI, kube-proxy), each in a network
//! namespace of its own, with the project's images imported; this wraps it for tests, the
//! benchmarks and the local run.
//!
//! One cluster per machine at a time: [`RealCluster::up`] fails while another one is up and
//! wanted (the script's lock and owner), and dropping the cluster (also while a failing test
//! unwinds) runs `hack/cluster.sh down`. If the owning process dies without unwinding (SIGKILL), the script's
//! watchdog removes everything as soon as it notices.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use crate::chart::{helm, repo_path};
use crate::netns::Netns;

/// Where the cluster keeps its state (the script's default).
pub const CLUSTER_DIR: &str = "/var/lib/uwsgi-it-cluster";
/// Where the script records what it changed outside its directory.
pub const MARKERS_DIR: &str = "/run/uwsgi-it-cluster";
/// The cgroup every process of the cluster runs in.
pub const CGROUP: &str = "uwsgi-it-cluster";

/// A running real cluster.
pub struct RealCluster {
    env: BTreeMap<String, String>,
    down: bool,
}

impl RealCluster {
    /// Blocking: builds what is missing (node binaries, images, Go tools; cached), brings the
    /// cluster up with the project released to its loopback registry (`hack/release.sh`), and
    /// waits until both nodes are Ready.
    pub fn up() -> Result<RealCluster> {
        if std::env::var_os("UWSGI_IT_CLUSTER_DIR").is_some() {
            bail!("UWSGI_IT_CLUSTER_DIR is not supported here: the checks look at {CLUSTER_DIR}");
        }
        let mut command = Command::new("bash");
        command
            .arg(repo_path("hack/cluster.sh"))
            .arg("up")
            .env("UWSGI_IT_CLUSTER_OWNER", std::process::id().to_string())
            .stdin(Stdio::null())
            .stderr(Stdio::inherit());
        let output = command.output().context("running hack/cluster.sh up")?;
        if !output.status.success() {
            bail!(
                "hack/cluster.sh up failed ({}); its logs are in /tmp/uwsgi-it-cluster-logs",
                output.status
            );
        }
        let env = parse_env(&String::from_utf8_lossy(&output.stdout));
        for key in [
            "KUBECONFIG",
            "HOME_ROOT",
            "REGISTRY",
            "CHART",
            "CHART_VERSION",
            "OPERATOR_IMAGE",
            "DISTRO_IMAGE",
            "DISTRO_ROOT_IMAGE",
        ] {
            if !env.contains_key(key) {
                bail!("hack/cluster.sh up did not report {key}");
            }
        }
        Ok(RealCluster { env, down: false })
    }

    /// A value `hack/cluster.sh up` reported (KUBECONFIG, HOME_ROOT, NODE_HYDRA, …).
    pub fn env(&self, key: &str) -> &str {
        self.env.get(key).map_or("", String::as_str)
    }

    pub fn kubeconfig(&self) -> &Path {
        Path::new(self.env("KUBECONFIG"))
    }

    /// Where the agents keep the homes on the host (the chart's `config.homeRoot`).
    pub fn home_root(&self) -> PathBuf {
        PathBuf::from(self.env("HOME_ROOT"))
    }

    /// The InternalIP of a server node (`server-1`, `server-2`).
    pub fn node_ip(&self, node: &str) -> Ipv4Addr {
        self.address("NODE", node)
    }

    /// The public address of a server node: a second address on it, what its Server declares.
    pub fn public_ip(&self, node: &str) -> Ipv4Addr {
        self.address("PUBLIC", node)
    }

    fn address(&self, kind: &str, node: &str) -> Ipv4Addr {
        let key = format!("{kind}_{}", node.to_uppercase().replace('-', "_"));
        self.env(&key).parse().unwrap_or(Ipv4Addr::UNSPECIFIED)
    }

    /// The network namespace of a server node (`server-1`): its host network, the agent's.
    pub fn node_netns(&self, node: &str) -> Result<Netns> {
        Netns::existing(&format!("uitc-{node}"))
    }

    /// The namespace test traffic comes from (198.18.0.100, outside every server).
    pub fn client_netns(&self) -> Result<Netns> {
        Netns::existing(self.env("CLIENT_NETNS"))
    }

    /// A cluster-admin client.
    pub async fn client(&self) -> Result<Client> {
        let yaml = std::fs::read_to_string(self.kubeconfig())?;
        let config = Config::from_custom_kubeconfig(
            Kubeconfig::from_yaml(&yaml)?,
            &KubeConfigOptions::default(),
        )
        .await?;
        Ok(Client::try_from(config)?)
    }

    /// `kubectl` with the admin kubeconfig.
    pub fn kubectl(&self) -> Command {
        let bin = crate::control_plane::locate_binaries().unwrap_or_default();
        let mut command = Command::new(bin.join("kubectl"));
        command.arg(format!("--kubeconfig={}", self.env("KUBECONFIG")));
        command
    }

    /// Runs kubectl with `args`; its stdout, or an error with its stderr.
    pub fn kubectl_run(&self, args: &[&str]) -> Result<String> {
        let output = self
            .kubectl()
            .args(args)
            .output()
            .context("running kubectl")?;
        if !output.status.success() {
            bail!(
                "kubectl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `kubectl apply` of a YAML text (one or more documents), as a user applies a file.
    pub fn apply(&self, yaml: &str) -> Result<()> {
        let mut kubectl = self.kubectl();
        kubectl.args(["apply", "-f", "-"]);
        crate::control_plane::run_with_input(kubectl, yaml)
    }

    /// `helm install --wait` into `namespace` of the chart `hack/cluster.sh up` released to the
    /// loopback registry (`oci://127.0.0.1:5000/charts/uwsgi-it-operator`), as a supplier
    /// installs a release: its default images are the ones pushed with it, pulled by digest.
    /// The controller Deployment (2 replicas, leader election) and the agent DaemonSet run as
    /// real Pods. `extra` are more `--set` values.
    pub fn install_chart(&self, release: &str, namespace: &str, extra: &[&str]) -> Result<()> {
        self.helm_release(
            "install",
            release,
            namespace,
            self.env("CHART_VERSION"),
            extra,
        )
    }

    /// `hack/release.sh` of `chart` (a chart directory) as `version` to the cluster's registry,
    /// with the images of the first release (the same build): what it printed (CHART,
    /// CHART_DIGEST, the image references).
    pub fn release(&self, chart: &Path, version: &str) -> Result<BTreeMap<String, String>> {
        let output = Command::new("bash")
            .arg(repo_path("hack/release.sh"))
            .arg(self.env("REGISTRY"))
            .arg(version)
            .env("RELEASE_CHART_DIR", chart)
            .env(
                "RELEASE_SOURCE_URL",
                format!("file://{}", repo_path(".").display()),
            )
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .context("running hack/release.sh")?;
        if !output.status.success() {
            bail!("hack/release.sh failed ({})", output.status);
        }
        Ok(parse_env(&String::from_utf8_lossy(&output.stdout)))
    }

    /// `helm upgrade --wait` of `release` to `version` of the released chart.
    pub fn upgrade_chart(
        &self,
        release: &str,
        namespace: &str,
        version: &str,
        extra: &[&str],
    ) -> Result<()> {
        self.helm_release("upgrade", release, namespace, version, extra)
    }

    fn helm_release(
        &self,
        verb: &str,
        release: &str,
        namespace: &str,
        version: &str,
        extra: &[&str],
    ) -> Result<()> {
        let mut sets = vec![format!("config.homeRoot={}", self.env("HOME_ROOT"))];
        sets.extend(extra.iter().map(|s| s.to_string()));
        let mut command = Command::new(helm()?);
        command
            .arg(verb)
            .arg(release)
            .arg(self.env("CHART"))
            .args(["--version", version, "--plain-http"])
            .args(["--namespace", namespace, "--create-namespace"])
            .args(["--wait", "--timeout", "3m"])
            .arg(format!("--kubeconfig={}", self.env("KUBECONFIG")));
        for set in &sets {
            command.args(["--set", set]);
        }
        let output = command
            .output()
            .with_context(|| format!("running helm {verb}"))?;
        if !output.status.success() {
            let pods = self
                .kubectl_run(&["get", "pods", "-A", "-o", "wide"])
                .unwrap_or_default();
            bail!(
                "helm {verb} failed: {}\n{pods}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(())
    }

    /// `helm test` of a release: the chart's check Pod must pass (its log is in the error).
    pub fn test_chart(&self, release: &str, namespace: &str) -> Result<String> {
        let output = Command::new(helm()?)
            .args([
                "test",
                release,
                "--namespace",
                namespace,
                "--timeout",
                "3m",
                "--logs",
            ])
            .arg(format!("--kubeconfig={}", self.env("KUBECONFIG")))
            .output()
            .context("running helm test")?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if !output.status.success() {
            bail!(
                "helm test failed: {}
{stdout}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(stdout)
    }

    /// Pods anywhere in the cluster that are in CrashLoopBackOff or whose containers restarted
    /// at all (a restart between two looks is seen too), as `namespace/name restarts reasons`.
    pub fn crash_looping_pods(&self) -> Result<Vec<String>> {
        let out = self.kubectl_run(&[
            "get",
            "pods",
            "-A",
            "-o",
            "jsonpath={range .items[*]}{.metadata.namespace}/{.metadata.name} restarts={range .status.containerStatuses[*]}{.restartCount},{end} {.status.containerStatuses[*].state.waiting.reason}{\"\\n\"}{end}",
        ])?;
        Ok(out
            .lines()
            .filter(|l| {
                let restarted = l
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("restarts="))
                    .is_some_and(|n| n.split(',').any(|c| c.parse::<u32>().unwrap_or(0) > 0));
                l.contains("CrashLoopBackOff") || restarted
            })
            .map(str::to_string)
            .collect())
    }

    /// Removes everything the cluster made and checks that nothing is left: no process in its
    /// cgroup, no cgroup, no network namespace, no mount, no directory.
    pub fn down(mut self) -> Result<()> {
        self.down = true;
        run_script("hack/cluster.sh", &["down"])?;
        let left = leftovers();
        if !left.is_empty() {
            bail!("hack/cluster.sh down left behind: {}", left.join("; "));
        }
        Ok(())
    }
}

impl Drop for RealCluster {
    fn drop(&mut self) {
        if !self.down {
            let _ = run_script("hack/cluster.sh", &["down"]);
        }
    }
}

/// What a cluster left on this machine: its processes, its cgroups, its network namespaces
/// (`uitc-*`; its Pods' live under its directory), its mounts, its directory, nft tables of its
/// components in the host's namespace. Empty when clean.
pub fn leftovers() -> Vec<String> {
    let mut left = Vec::new();
    if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
        for hierarchy in hierarchies.flatten() {
            let dir = hierarchy.path().join(CGROUP);
            if dir.exists() {
                left.push(format!("cgroup {}", dir.display()));
            }
        }
    }
    if let Ok(namespaces) = std::fs::read_dir("/run/netns") {
        for ns in namespaces.flatten() {
            let name = ns.file_name().to_string_lossy().into_owned();
            if name.starts_with("uitc-") {
                left.push(format!("netns {name}"));
            }
        }
    }
    if let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") {
        for line in mounts.lines() {
            if let Some(point) = line.split(' ').nth(4)
                && point.starts_with(CLUSTER_DIR)
            {
                left.push(format!("mount {point}"));
            }
        }
    }
    if Path::new(CLUSTER_DIR).exists() {
        left.push(format!("directory {CLUSTER_DIR}"));
    }
    for process in cluster_processes() {
        left.push(format!("process {process}"));
    }
    // The nodes' tables (kube-proxy's, the agent's) live in the nodes' namespaces and go with
    // them; one in this host's namespace would be a leak into the machine's own firewall.
    if let Ok(output) = Command::new("nft").args(["list", "tables"]).output() {
        for table in String::from_utf8_lossy(&output.stdout).lines() {
            if table.contains("kube-proxy") || table.contains("uwsgi_it") || table.contains("uitc")
            {
                left.push(format!("nft {table} in the host's namespace"));
            }
        }
    }
    if Path::new("/sys/class/net/uitc-host").exists() {
        left.push("link uitc-host".into());
    }
    if Path::new(MARKERS_DIR).exists() {
        left.push(format!("directory {MARKERS_DIR}"));
    }
    if let Ok(links) = std::fs::read_dir("/var/log/containers") {
        for link in links.flatten() {
            if std::fs::read_link(link.path()).is_ok_and(|t| t.starts_with(CLUSTER_DIR)) {
                left.push(format!("log link {}", link.path().display()));
            }
        }
    }
    left
}

/// The cluster's programs still running anywhere on the machine (by their command line).
fn cluster_processes() -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(CLUSTER_DIR) && !cmdline.contains("cluster.sh") {
            found.push(format!(
                "{} {}",
                entry.file_name().to_string_lossy(),
                cmdline.chars().take(120).collect::<String>()
            ));
        }
    }
    found
}

/// Where `hack/images.sh` puts the images.
pub fn images_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("UWSGI_IT_IMAGES") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache/uwsgi-it-operator/images")
}

fn run_script(script: &str, args: &[&str]) -> Result<()> {
    let status = Command::new("bash")
        .arg(repo_path(script))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status()
        .with_context(|| format!("running {script}"))?;
    if !status.success() {
        bail!("{script} {} failed with {status}", args.join(" "));
    }
    Ok(())
}

fn parse_env(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// One HTTP/1.0 GET from inside `netns`: the status code and the body.
pub fn http_get(
    netns: &Netns,
    address: SocketAddrV4,
    path: &str,
    timeout: Duration,
) -> io::Result<(u16, String)> {
    let mut stream = netns
        .enter(move || TcpStream::connect_timeout(&address.into(), timeout))
        .map_err(io::Error::other)??;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no HTTP status line"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Waits until the object's condition `type_` is `True`; on timeout the error shows the last
/// status seen.
pub async fn wait_condition<K>(
    api: &kube::Api<K>,
    name: &str,
    type_: &str,
    timeout: Duration,
) -> Result<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let (object, _) =
        wait_condition_matching(api, name, type_, "True", timeout, |c| c["status"] == "True")
            .await?;
    Ok(object)
}

/// Waits until the object's condition `type_` has `reason`; returns its message.
pub async fn wait_reason<K>(
    api: &kube::Api<K>,
    name: &str,
    type_: &str,
    reason: &str,
    timeout: Duration,
) -> Result<String>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let (_, condition) =
        wait_condition_matching(api, name, type_, reason, timeout, |c| c["reason"] == reason)
            .await?;
    Ok(condition["message"]
        .as_str()
        .unwrap_or_default()
        .to_string())
}

/// Polls the object until its condition `type_` satisfies `wanted` (described as `what`);
/// returns the object and the condition.
async fn wait_condition_matching<K>(
    api: &kube::Api<K>,
    name: &str,
    type_: &str,
    what: &str,
    timeout: Duration,
    wanted: impl Fn(&serde_json::Value) -> bool,
) -> Result<(K, serde_json::Value)>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = serde_json::Value::Null;
    loop {
        if let Some(object) = api.get_opt(name).await? {
            let value = serde_json::to_value(&object)?;
            let condition = value["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["type"] == type_)
                .cloned();
            if let Some(condition) = condition.filter(|c| wanted(c)) {
                return Ok((object, condition));
            }
            last = value["status"].clone();
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{name}: {type_} not {what} within {timeout:?}; last status: {last}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Writes a file into a container's home as its customer would: owned by the container's uid,
/// and (renamed into place) never seen half-written by the Emperor.
pub fn write_as_customer(path: &Path, contents: &str, uid: u32) -> Result<()> {
    let dir = path.parent().context("a path with a parent")?;
    let name = path.file_name().context("a path with a file name")?;
    let temporary = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    std::fs::write(&temporary, contents)
        .with_context(|| format!("writing {}", temporary.display()))?;
    std::os::unix::fs::chown(&temporary, Some(uid), Some(uid))?;
    std::fs::rename(&temporary, path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_output_is_read_as_key_value_lines() {
        let env = parse_env("KUBECONFIG=/x/kubeconfig\nnoise\nNODE_HYDRA=198.18.0.11\n");
        assert_eq!(env["KUBECONFIG"], "/x/kubeconfig");
        assert_eq!(env["NODE_HYDRA"], "198.18.0.11");
        assert_eq!(env.len(), 2);
    }
}
