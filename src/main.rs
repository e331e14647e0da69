//! `uwsgi-it-operator`: one binary, one subcommand per program.

mod check;
mod crd_upgrade;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{ArgAction, Parser, Subcommand, ValueEnum};
use uwsgi_it_domain::config::OperatorConfig;

/// The controller's caches are millions of small allocations (names, condition strings,
/// references). glibc's malloc gives each at least a 32-byte chunk and keeps what is freed in
/// per-thread arenas; jemalloc's small size classes kept the peak resident set at 50,000
/// containers 19 MiB lower (and mimalloc 12 MiB higher), as the admission benchmark measures.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    version,
    about = "uwsgi.it hosting on Kubernetes: controller, node agent and CRDs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller: admission, identities, workloads, status (one active replica).
    Controller {
        /// The operator configuration file (every key optional); defaults apply without one.
        #[arg(long, env = "UWSGI_IT_CONFIG")]
        config: Option<PathBuf>,
        /// Where /healthz, /readyz and /metrics are served.
        #[arg(long, default_value = "0.0.0.0:8080")]
        listen: SocketAddr,
        /// Namespace holding the leader-election Lease and the uid store.
        #[arg(long, env = "POD_NAMESPACE", default_value = "uwsgi-it-system")]
        namespace: String,
        /// This replica's identity in the Lease (defaults to the host name).
        #[arg(long, env = "POD_NAME")]
        identity: Option<String>,
        /// Take part in leader election; only the leader acts.
        #[arg(long, default_value_t = true, action = ArgAction::Set)]
        leader_elect: bool,
        /// Log format.
        #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Run the node agent: homes and port forwards of one server node (a DaemonSet Pod).
    Agent {
        /// The operator configuration file (every key optional); defaults apply without one.
        #[arg(long, env = "UWSGI_IT_CONFIG")]
        config: Option<PathBuf>,
        /// The Node this agent serves (from the downward API's spec.nodeName).
        #[arg(long, env = "NODE_NAME", required_unless_present = "cleanup")]
        node_name: Option<String>,
        /// Remove every forwarding rule the agent owns (nftables table and iptables chains) from
        /// this host's network and exit; homes are left alone. For a node that stops being a
        /// server.
        #[arg(long)]
        cleanup: bool,
        /// Where /healthz, /readyz and /metrics are served. The agent shares the server's
        /// network, so the default keeps them off its public address.
        #[arg(long, default_value = "127.0.0.1:9180")]
        listen: SocketAddr,
        /// Extra container networks (CIDR) to masquerade for hairpin traffic, besides the
        /// Node's pod CIDRs; repeatable.
        #[arg(
            long = "container-network",
            env = "UWSGI_IT_CONTAINER_NETWORKS",
            value_delimiter = ','
        )]
        container_networks: Vec<String>,
        /// Log format.
        #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Check that the install answers (what `helm test` runs): every CRD established, a
    /// controller replica leading, every agent ready.
    Check {
        /// The release namespace (the controller's Lease and the agent DaemonSet).
        #[arg(long, env = "POD_NAMESPACE", default_value = "uwsgi-it-system")]
        namespace: String,
        /// The agent DaemonSet's name.
        #[arg(long)]
        agent_daemonset: String,
        /// Seconds to keep trying before failing.
        #[arg(long, default_value_t = 120)]
        timeout_seconds: u64,
    },
    /// Write the CustomResourceDefinitions generated from the Rust types, or (`--apply`) write
    /// a chart's CRD files to the cluster (the chart's pre-upgrade hook).
    Crds {
        /// Directory to write one YAML file per CRD into; prints them to stdout when omitted.
        #[arg(long, conflicts_with = "apply")]
        out: Option<PathBuf>,
        /// Directory of CRD files (`*.yaml`, one CRD each, only this operator's) to write to
        /// the cluster whole, waiting until each is established.
        #[arg(long)]
        apply: Option<PathBuf>,
        /// Seconds to wait for the applied CRDs to be established.
        #[arg(long, default_value_t = 60)]
        timeout_seconds: u64,
    },
}

/// How logs are written.
#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (for log collectors).
    Json,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crds {
            apply: Some(dir),
            timeout_seconds,
            ..
        } => {
            let crds = crd_upgrade::read(&dir)?;
            tokio::runtime::Runtime::new()?.block_on(async move {
                let client = kube::Client::try_default()
                    .await
                    .context("connecting to the Kubernetes API")?;
                crd_upgrade::apply(
                    client,
                    crds,
                    std::time::Duration::from_secs(timeout_seconds),
                )
                .await
            })
        }
        Command::Crds { out, .. } => write_crds(out),
        Command::Check {
            namespace,
            agent_daemonset,
            timeout_seconds,
        } => tokio::runtime::Runtime::new()?.block_on(async move {
            let client = kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API")?;
            check::run(
                client,
                check::Target {
                    namespace,
                    agent_daemonset,
                    timeout: std::time::Duration::from_secs(timeout_seconds),
                },
            )
            .await
        }),
        Command::Agent {
            config,
            cleanup: true,
            ..
        } => {
            let config = load_config(config.as_deref())?;
            let removed = uwsgi_it_agent::cleanup(
                &uwsgi_it_agent::NetworkNamespace::Current,
                config.port_forward.command_timeout,
            )?;
            if removed.is_empty() {
                println!("nothing of uwsgi-it-operator's to remove");
            }
            for what in removed {
                println!("removed uwsgi-it-operator's {what}");
            }
            Ok(())
        }
        Command::Agent {
            config,
            node_name,
            listen,
            container_networks,
            log_format,
            ..
        } => run_agent(
            config,
            node_name.unwrap_or_default(),
            listen,
            container_networks,
            log_format,
        ),
        Command::Controller {
            config,
            listen,
            namespace,
            identity,
            leader_elect,
            log_format,
        } => {
            let config = load_config(config.as_deref())?;
            uwsgi_it_telemetry::init_tracing(
                &config.log_level,
                matches!(log_format, LogFormat::Json),
            );
            let mut options = uwsgi_it_controller::Options::new(config, namespace);
            options.listen = Some(listen);
            options.leader_election = leader_elect;
            if let Some(identity) = identity {
                options.identity = identity;
            }
            tokio::runtime::Runtime::new()?.block_on(async move {
                let client = kube::Client::try_default()
                    .await
                    .context("connecting to the Kubernetes API")?;
                uwsgi_it_controller::run(client, options, shutdown_signal()).await
            })
        }
    }
}

fn run_agent(
    config: Option<PathBuf>,
    node_name: String,
    listen: SocketAddr,
    container_networks: Vec<String>,
    log_format: LogFormat,
) -> anyhow::Result<()> {
    let config = load_config(config.as_deref())?;
    uwsgi_it_telemetry::init_tracing(&config.log_level, matches!(log_format, LogFormat::Json));
    let container_networks = container_networks
        .iter()
        .map(|text| {
            text.parse()
                .with_context(|| format!("--container-network {text}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let options = uwsgi_it_agent::AgentOptions {
        node_name,
        config,
        netns: uwsgi_it_agent::NetworkNamespace::Current,
        container_networks,
    };
    tokio::runtime::Runtime::new()?.block_on(async move {
        // Bound before anything else, so a taken port stops the agent at start.
        let listener = uwsgi_it_telemetry::bind(listen).await?;
        let client = kube::Client::try_default()
            .await
            .context("connecting to the Kubernetes API")?;
        let agent = uwsgi_it_agent::Agent::new(client, options)?;
        let (stop_serving, serving_stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(uwsgi_it_telemetry::serve(
            listener,
            agent.registry(),
            agent.ready(),
            agent.health(),
            async move {
                let _ = serving_stopped.await;
            },
        ));
        let outcome = agent.run(shutdown_signal()).await;
        let _ = stop_serving.send(());
        let _ = server.await;
        outcome
    })
}

/// Reads and validates the operator configuration; a bad file stops the program here, with
/// the key named in the error.
fn load_config(path: Option<&Path>) -> anyhow::Result<OperatorConfig> {
    let Some(path) = path else {
        return Ok(OperatorConfig::default());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the configuration {}", path.display()))?;
    OperatorConfig::from_yaml(&text).with_context(|| format!("in {}", path.display()))
}

/// Resolves on SIGTERM (Kubernetes stopping the Pod) or Ctrl-C.
async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

fn write_crds(out: Option<PathBuf>) -> anyhow::Result<()> {
    let manifests = uwsgi_it_api::crd_manifests().context("rendering the CRDs")?;
    match out {
        None => {
            for manifest in manifests {
                print!("---\n{}", manifest.yaml);
            }
        }
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for manifest in manifests {
                let path = dir.join(&manifest.file_name);
                std::fs::write(&path, manifest.yaml)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
    }
    Ok(())
}
