//! The operator configuration: one YAML file (a ConfigMap rendered from the Helm values) read
//! by both the controller and the agent. Every key is optional with a safe default; a bad value
//! stops the program at start with an error naming the key.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::forwarding::Ipv4Cidr;
use crate::ports::{MIN_PUBLIC_PORT, PortPolicy, PortRange, ReservedPorts, ReservedPortsError};

/// What happens to a container's home when the container is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum HomeRetention {
    /// Leave the home where it is.
    Retain,
    /// Move it into `<homeRoot>/.archive/<uid>-<time>` (the default: nothing is lost).
    #[default]
    Archive,
    /// Remove it.
    Delete,
}

/// The netfilter backend the agent programs port forwards with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ForwardingBackend {
    /// One `ip uwsgi_it` table, written in one `nft` transaction (the default).
    #[default]
    Nftables,
    /// Own chains in the nat table through `iptables-restore --noflush`.
    Iptables,
}

/// Which iptables the agent uses (for the iptables backend and the `FORWARD` accept): the one
/// the host's other components use, since rules in the other flavour are invisible to them and
/// ordered apart from theirs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IptablesMode {
    /// Whichever flavour holds the host's rules (see [`choose_iptables_mode`]).
    #[default]
    Auto,
    /// iptables over nf_tables (`iptables-nft`).
    Nft,
    /// The legacy xtables (`iptables-legacy`).
    Legacy,
}

/// The flavour the host's rules are in, as kube-proxy's iptables wrapper decides: the legacy one
/// when it holds more rules than the nft one (other than the agent's own), else nft, the
/// default of current distributions.
pub fn choose_iptables_mode(legacy_rules: usize, nft_rules: usize) -> IptablesMode {
    if legacy_rules > nft_rules {
        IptablesMode::Legacy
    } else {
        IptablesMode::Nft
    }
}

/// Port-forwarding settings of the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortForwardConfig {
    /// Which netfilter backend to use.
    pub backend: ForwardingBackend,
    /// Which iptables flavour (`portForward.iptablesMode`).
    pub iptables_mode: IptablesMode,
    /// How often the whole ruleset is rewritten even when nothing changed (repairs drift).
    pub resync_period: Duration,
    /// How long one `nft`, `iptables-restore`, `iptables-save` or `conntrack` may run before the
    /// agent kills it and counts the sync as failed.
    pub command_timeout: Duration,
    /// The agent's `/healthz` fails when its last successful sync is older than this (so a
    /// kubelet restarts an agent whose tools hang or whose loop is stuck), like kube-proxy's.
    pub max_sync_age: Duration,
}

/// The validated operator configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorConfig {
    /// Where container homes live on every server node (absolute, normalised).
    pub home_root: PathBuf,
    /// What deleting a container does to its home.
    pub home_retention: HomeRetention,
    /// Platform distro name → container image.
    pub distros: BTreeMap<String, String>,
    /// The image a container on a custom distro starts from: only its empty mount points are
    /// used (everything the container runs comes from the distro). `None`: containers with a
    /// customDistro do not run, and say so.
    pub custom_distro_image: Option<String>,
    /// `publicPorts` and `reservedPorts`: which public ports PortMappings may take.
    pub port_policy: PortPolicy,
    /// `podNetworks`: where the cluster's Pod addresses come from. Each customer namespace's
    /// NetworkPolicy admits any source outside them (clients through the public forwards) and,
    /// inside them, only the namespace's own Pods and those of non-customer namespaces.
    pub pod_networks: Vec<Ipv4Cidr>,
    /// Port-forwarding settings.
    pub port_forward: PortForwardConfig,
    /// Log filter directive (`info`, `debug`, `uwsgi_it_agent=trace`, ...).
    pub log_level: String,
    /// ClusterRole the controller binds each customer's users and groups to.
    pub customer_cluster_role: String,
    /// ConfigMap (in the controller's namespace) holding the uid high-water mark.
    pub uid_store: String,
    /// How long the deletion of a container waits for its server's agent to release the home
    /// before it completes anyway (with a Warning; the home is left where it is).
    pub release_timeout: Duration,
}

impl Default for OperatorConfig {
    fn default() -> Self {
        OperatorConfig {
            home_root: PathBuf::from("/containers"),
            home_retention: HomeRetention::default(),
            distros: BTreeMap::new(),
            custom_distro_image: None,
            port_policy: PortPolicy::default(),
            pod_networks: DEFAULT_POD_NETWORKS
                .iter()
                .map(|n| n.parse().expect("valid default"))
                .collect(),
            port_forward: PortForwardConfig {
                backend: ForwardingBackend::default(),
                iptables_mode: IptablesMode::default(),
                resync_period: Duration::from_secs(30),
                command_timeout: Duration::from_secs(10),
                max_sync_age: default_max_sync_age(
                    Duration::from_secs(30),
                    Duration::from_secs(10),
                ),
            },
            log_level: "info".into(),
            customer_cluster_role: "uwsgi-it-customer".into(),
            uid_store: "uwsgi-it-uids".into(),
            release_timeout: Duration::from_secs(600),
        }
    }
}

/// The default `podNetworks`: every private and shared address range, where Pod networks are
/// allocated. Clients on them reach customers' containers only if the supplier narrows this.
pub const DEFAULT_POD_NETWORKS: &[&str] = &[
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
];

/// A configuration the programs refuse to start with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The file is not YAML of the expected shape (unknown key, wrong type, bad enum value).
    #[error("configuration is not valid: {0}")]
    Syntax(String),
    /// `homeRoot` is not an absolute, normalised path.
    #[error("homeRoot {0:?} must be an absolute path without '.' or '..' components")]
    HomeRoot(String),
    /// A `reservedPorts` entry is invalid.
    #[error(transparent)]
    ReservedPorts(#[from] ReservedPortsError),
    /// A `podNetworks` entry is not an IPv4 CIDR.
    #[error("podNetworks[{index}] {text:?}: {problem}")]
    PodNetworks {
        index: usize,
        text: String,
        problem: String,
    },
    /// `publicPorts` is not a range inside 1025-65535.
    #[error("publicPorts {text:?}: {problem}")]
    PublicPorts { text: String, problem: String },
    /// `portForward.commandTimeout` is not a duration.
    #[error("portForward.commandTimeout {0:?} must be a duration like 10s or 1m, at least 1s")]
    CommandTimeout(String),
    /// `portForward.maxSyncAge` is not a duration longer than the resync period.
    #[error(
        "portForward.maxSyncAge {text:?} must be a duration like 2m, longer than portForward.resyncPeriod ({resync_seconds}s) plus portForward.commandTimeout ({timeout_seconds}s)"
    )]
    MaxSyncAge {
        text: String,
        resync_seconds: u64,
        timeout_seconds: u64,
    },
    /// `portForward.resyncPeriod` is not a duration.
    #[error("portForward.resyncPeriod {0:?} must be a duration like 30s, 5m or 1h, at least 1s")]
    ResyncPeriod(String),
    /// `releaseTimeout` is not a duration.
    #[error("releaseTimeout {0:?} must be a duration like 30s, 5m or 1h, at least 1s")]
    ReleaseTimeout(String),
    /// A `distros` entry is empty.
    #[error("distros.{0}: the image must not be empty")]
    DistroImage(String),
    /// `logLevel` is empty.
    #[error("logLevel must not be empty")]
    LogLevel,
    /// A name that must be a Kubernetes object name is empty.
    #[error("{0} must not be empty")]
    EmptyName(&'static str),
    /// `customerClusterRole` would be the name of a Customer's reader ClusterRole.
    #[error(
        "customerClusterRole {0:?} must not start with {CUSTOMER_READER_PREFIX:?}: the controller names each Customer's reader ClusterRole so, and a Customer could take it over"
    )]
    CustomerClusterRole(String),
}

/// Prefix of the ClusterRole (and ClusterRoleBinding) by which each Customer's users read their
/// own Customer and the Servers only they own: `uwsgi-it-customer-<customer>`.
pub const CUSTOMER_READER_PREFIX: &str = "uwsgi-it-customer-";

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawConfig {
    home_root: Option<String>,
    home_retention: Option<HomeRetention>,
    distros: Option<BTreeMap<String, String>>,
    custom_distro_image: Option<String>,
    public_ports: Option<String>,
    reserved_ports: Option<Vec<String>>,
    pod_networks: Option<Vec<String>>,
    port_forward: Option<RawPortForward>,
    log_level: Option<String>,
    customer_cluster_role: Option<String>,
    uid_store: Option<String>,
    release_timeout: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawPortForward {
    backend: Option<ForwardingBackend>,
    iptables_mode: Option<IptablesMode>,
    resync_period: Option<String>,
    command_timeout: Option<String>,
    max_sync_age: Option<String>,
}

impl OperatorConfig {
    /// Parses and validates the configuration file's text. An empty text is the default
    /// configuration.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = if text.trim().is_empty() {
            RawConfig::default()
        } else {
            serde_saphyr::from_str::<Option<RawConfig>>(text)
                .map_err(|e| ConfigError::Syntax(e.to_string()))?
                .unwrap_or_default()
        };
        let defaults = OperatorConfig::default();
        let home_root = match raw.home_root {
            Some(root) => validate_home_root(&root)?,
            None => defaults.home_root,
        };
        let distros = raw.distros.unwrap_or_default();
        if let Some((name, _)) = distros.iter().find(|(_, image)| image.trim().is_empty()) {
            return Err(ConfigError::DistroImage(name.clone()));
        }
        let custom_distro_image = match raw.custom_distro_image {
            Some(image) if image.trim().is_empty() => {
                return Err(ConfigError::EmptyName("customDistroImage"));
            }
            image => image,
        };
        let reserved = match raw.reserved_ports {
            Some(entries) => ReservedPorts::parse(entries)?,
            None => defaults.port_policy.reserved,
        };
        let public = match raw.public_ports {
            Some(text) => parse_public_ports(&text)?,
            None => defaults.port_policy.public,
        };
        let pod_networks = match raw.pod_networks {
            Some(entries) => entries
                .iter()
                .enumerate()
                .map(|(index, text)| {
                    let fail = |problem: String| ConfigError::PodNetworks {
                        index,
                        text: text.clone(),
                        problem,
                    };
                    let network: Ipv4Cidr = text
                        .parse()
                        .map_err(|e: crate::forwarding::RulesetError| fail(e.to_string()))?;
                    // A NetworkPolicy's `except` must be strictly inside 0.0.0.0/0.
                    if network.prefix_len() == 0 {
                        return Err(fail("must not be the whole address space".into()));
                    }
                    Ok(network)
                })
                .collect::<Result<Vec<_>, _>>()?,
            None => defaults.pod_networks,
        };
        let forward = raw.port_forward.unwrap_or_default();
        let resync_period = match forward.resync_period {
            Some(text) => parse_duration(&text).ok_or(ConfigError::ResyncPeriod(text))?,
            None => defaults.port_forward.resync_period,
        };
        let command_timeout = match forward.command_timeout {
            Some(text) => parse_duration(&text).ok_or(ConfigError::CommandTimeout(text))?,
            None => defaults.port_forward.command_timeout,
        };
        let max_sync_age = match forward.max_sync_age {
            Some(text) => parse_duration(&text)
                .filter(|age| *age > resync_period + command_timeout)
                .ok_or(ConfigError::MaxSyncAge {
                    text,
                    resync_seconds: resync_period.as_secs(),
                    timeout_seconds: command_timeout.as_secs(),
                })?,
            // Four resync periods and two timeouts: one slow or failed sync never restarts the
            // agent, a stuck loop does within minutes.
            None => default_max_sync_age(resync_period, command_timeout),
        };
        let log_level = raw.log_level.unwrap_or(defaults.log_level);
        if log_level.trim().is_empty() {
            return Err(ConfigError::LogLevel);
        }
        let customer_cluster_role = non_empty(
            "customerClusterRole",
            raw.customer_cluster_role,
            defaults.customer_cluster_role,
        )?;
        if customer_cluster_role.starts_with(CUSTOMER_READER_PREFIX) {
            return Err(ConfigError::CustomerClusterRole(customer_cluster_role));
        }
        let uid_store = non_empty("uidStore", raw.uid_store, defaults.uid_store)?;
        let release_timeout = match raw.release_timeout {
            Some(text) => parse_duration(&text).ok_or(ConfigError::ReleaseTimeout(text))?,
            None => defaults.release_timeout,
        };
        Ok(OperatorConfig {
            home_root,
            home_retention: raw.home_retention.unwrap_or_default(),
            distros,
            custom_distro_image,
            port_policy: PortPolicy { public, reserved },
            pod_networks,
            port_forward: PortForwardConfig {
                backend: forward.backend.unwrap_or_default(),
                iptables_mode: forward.iptables_mode.unwrap_or_default(),
                resync_period,
                command_timeout,
                max_sync_age,
            },
            log_level,
            customer_cluster_role,
            uid_store,
            release_timeout,
        })
    }
}

fn non_empty(
    key: &'static str,
    value: Option<String>,
    default: String,
) -> Result<String, ConfigError> {
    match value {
        Some(v) if v.trim().is_empty() => Err(ConfigError::EmptyName(key)),
        Some(v) => Ok(v),
        None => Ok(default),
    }
}

fn validate_home_root(root: &str) -> Result<PathBuf, ConfigError> {
    let path = Path::new(root);
    let normal = path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if normal {
        Ok(path.components().collect())
    } else {
        Err(ConfigError::HomeRoot(root.to_string()))
    }
}

fn default_max_sync_age(resync_period: Duration, command_timeout: Duration) -> Duration {
    4 * resync_period + 2 * command_timeout
}

/// `publicPorts`: one range (`"1025-65535"`) or port, starting at 1025 or above.
fn parse_public_ports(text: &str) -> Result<PortRange, ConfigError> {
    let fail = |problem: String| ConfigError::PublicPorts {
        text: text.to_owned(),
        problem,
    };
    let range: PortRange = text
        .parse()
        .map_err(|e: crate::ports::PortRangeError| fail(e.to_string()))?;
    if range.start() < MIN_PUBLIC_PORT {
        return Err(fail(format!(
            "must start at {MIN_PUBLIC_PORT} or above (lower ports are the server's own services)"
        )));
    }
    Ok(range)
}

/// Parses `30s`, `5m`, `1h` (whole numbers, one unit, at least one second).
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let unit_at = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(unit_at);
    let number: u64 = number.parse().ok()?;
    let seconds = match unit {
        "s" => number,
        "m" => number.checked_mul(60)?,
        "h" => number.checked_mul(3600)?,
        _ => return None,
    };
    (seconds > 0).then(|| Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_default_configuration() {
        assert_eq!(
            OperatorConfig::from_yaml("").unwrap(),
            OperatorConfig::default()
        );
        assert_eq!(
            OperatorConfig::from_yaml("# nothing\n").unwrap(),
            OperatorConfig::default()
        );
    }

    #[test]
    fn every_key_is_read() {
        let config = OperatorConfig::from_yaml(
            r#"
homeRoot: /srv/homes/
homeRetention: Delete
distros:
  bookworm: debian:bookworm-slim
publicPorts: "2000-40000"
reservedPorts: ["8000-8100", "9999"]
portForward:
  backend: iptables
  resyncPeriod: 2m
  commandTimeout: 5s
  maxSyncAge: 10m
logLevel: debug
customerClusterRole: hosting-customer
uidStore: uids
"#,
        )
        .unwrap();
        assert_eq!(config.home_root, PathBuf::from("/srv/homes"));
        assert_eq!(config.home_retention, HomeRetention::Delete);
        assert_eq!(config.distros["bookworm"], "debian:bookworm-slim");
        assert!(config.port_policy.reserved.contains(8050));
        assert!(config.port_policy.reserved.contains(9999));
        assert!(!config.port_policy.reserved.contains(30000));
        assert_eq!(config.port_policy.public.to_string(), "2000-40000");
        assert_eq!(config.port_forward.backend, ForwardingBackend::Iptables);
        assert_eq!(config.port_forward.resync_period, Duration::from_secs(120));
        assert_eq!(config.port_forward.command_timeout, Duration::from_secs(5));
        assert_eq!(config.port_forward.max_sync_age, Duration::from_secs(600));
        assert_eq!(config.log_level, "debug");
        assert_eq!(config.customer_cluster_role, "hosting-customer");
        assert_eq!(
            OperatorConfig::from_yaml("customerClusterRole: uwsgi-it-customer-admin"),
            Err(ConfigError::CustomerClusterRole(
                "uwsgi-it-customer-admin".into()
            )),
            "a Customer named admin would own that ClusterRole"
        );
        assert_eq!(config.uid_store, "uids");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("homeRoot: relative/path", "homeRoot"),
            ("homeRoot: /a/../b", "homeRoot"),
            ("homeRetention: Sometimes", "homeRetention"),
            ("portForward: {backend: pf}", "backend"),
            (
                "portForward: {resyncPeriod: soon}",
                "portForward.resyncPeriod",
            ),
            (
                "portForward: {resyncPeriod: 0s}",
                "portForward.resyncPeriod",
            ),
            ("reservedPorts: ['70000']", "reservedPorts"),
            ("publicPorts: '80-9000'", "publicPorts"),
            ("publicPorts: 'many'", "publicPorts"),
            ("podNetworks: ['10.244.0.0']", "podNetworks[0]"),
            ("podNetworks: ['10.0.0.0/8', '0.0.0.0/0']", "podNetworks[1]"),
            (
                "portForward: {commandTimeout: 0s}",
                "portForward.commandTimeout",
            ),
            (
                "portForward: {resyncPeriod: 1m, maxSyncAge: 1m}",
                "portForward.maxSyncAge",
            ),
            ("distros: {bookworm: ''}", "distros.bookworm"),
            ("customDistroImage: ' '", "customDistroImage"),
            ("customerClusterRole: ''", "customerClusterRole"),
            ("homeRot: /x", "homeRot"),
        ];
        for (text, key) in cases {
            let err = OperatorConfig::from_yaml(text).expect_err(text).to_string();
            assert!(err.contains(key), "{text}: {err} does not name {key}");
        }
    }

    #[test]
    fn the_iptables_flavour_with_more_rules_wins_and_nft_breaks_ties() {
        assert_eq!(choose_iptables_mode(0, 0), IptablesMode::Nft);
        assert_eq!(choose_iptables_mode(5, 5), IptablesMode::Nft);
        assert_eq!(choose_iptables_mode(6, 5), IptablesMode::Legacy);
        assert_eq!(choose_iptables_mode(0, 40), IptablesMode::Nft);
        let config = OperatorConfig::from_yaml("portForward: {iptablesMode: legacy}").unwrap();
        assert_eq!(config.port_forward.iptables_mode, IptablesMode::Legacy);
        assert!(OperatorConfig::from_yaml("portForward: {iptablesMode: both}").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        for bad in ["", "s", "10", "1.5s", "-1s", "0m", "3d"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }
}
