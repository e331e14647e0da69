//! Programs the node's public port forwards into netfilter.
//!
//! Two backends give the same behaviour: [`NftBackend`] (the default; owns `table ip uwsgi_it`)
//! and [`IptablesBackend`] (owns four `UWSGI-IT-*` chains of table `nat`, for hosts without nft).
//! The rules themselves are rendered by `uwsgi_it_domain::forwarding`; this module runs the
//! tools.
//!
//! Two ways in, kube-proxy style:
//!
//! - [`ForwardingBackend::apply`] (first sync, periodic resync) reads what the kernel holds and
//!   compares it with the desired state. When they match nothing is written, so an agent
//!   restart, an API outage or a periodic resync never disturbs working rules. When they differ
//!   (a change, or drift such as someone running `nft flush ruleset`) the owned objects are
//!   replaced in one atomic transaction.
//! - [`ForwardingBackend::apply_incremental`] (the event path) never reads the kernel: each
//!   backend remembers, in memory, the ruleset it last wrote or confirmed, and writes only the
//!   difference as one atomic transaction (element operations for nft, `-D`/`-A` lines for
//!   iptables), so one added mapping costs the same at 10 or 10,000 mappings. When nothing is
//!   remembered (after a restart, or after a failed write) or the transaction fails (the table
//!   was changed behind the agent's back: a missing element, table or rule), it falls back to
//!   `apply`. Drift that the transaction cannot notice (say, an admin deleting one of the rules)
//!   is repaired by the next periodic `apply`.
//!
//! After either kind of write the conntrack entries of UDP forwards that changed are deleted.
//!
//! The API is synchronous (it runs `nft`, `iptables-restore`, `iptables-save` and `conntrack`
//! as child processes and waits for them); call it from `tokio::task::spawn_blocking`. Every
//! child runs under a timeout ([`Tools`]): a tool that hangs (a held xtables lock, a wedged
//! kernel call) is killed and the sync fails with the tool's own stderr, instead of freezing the
//! agent unnoticed.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use uwsgi_it_domain::config::{IptablesMode, choose_iptables_mode};
use wait_timeout::ChildExt;

use uwsgi_it_domain::forwarding::iptables::{self, JumpRule};
use uwsgi_it_domain::forwarding::nft::{self, ListingError};
use uwsgi_it_domain::forwarding::{ForwardingRuleset, RulesetDiff, UdpFlowKey, stale_udp_flows};

/// Where the tools run: in the agent's own network namespace (production: the host's, since the
/// agent Pod uses `hostNetwork`), or inside a named one through `ip netns exec` (tests).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum CommandScope {
    #[default]
    CurrentNamespace,
    Netns(String),
}

impl CommandScope {
    fn command(&self, program: &str) -> Command {
        match self {
            CommandScope::CurrentNamespace => Command::new(program),
            CommandScope::Netns(name) => {
                // `ip netns exec` execs the program, so a kill on timeout reaches the tool.
                let mut command = Command::new("ip");
                command.args(["netns", "exec", name, program]);
                command
            }
        }
    }
}

/// How the backends run their tools: where ([`CommandScope`]), for how long at most, and which
/// iptables flavour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tools {
    pub scope: CommandScope,
    /// A child still running after this is killed (`portForward.commandTimeout`).
    pub timeout: Duration,
    /// `None`: the host's plain `iptables-save`/`iptables-restore`, whatever they are.
    pub iptables: Option<IptablesMode>,
}

impl Tools {
    /// The default of `portForward.commandTimeout`.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

    pub fn new(scope: CommandScope, timeout: Duration) -> Tools {
        Tools {
            scope,
            timeout,
            iptables: None,
        }
    }

    /// The same, with `iptables-save`/`iptables-restore` of `mode` (resolving `Auto` by looking
    /// at both flavours' rules). A host where the flavoured tools are missing keeps the plain
    /// ones.
    pub fn with_iptables(mut self, mode: IptablesMode) -> Tools {
        let mode = match mode {
            IptablesMode::Auto => self.detect_iptables_mode(),
            chosen => Some(chosen),
        };
        self.iptables = mode;
        self
    }

    /// Counts the rules in both flavours (all tables, the agent's own left out) and chooses
    /// with `choose_iptables_mode`; `None` when either tool cannot run.
    fn detect_iptables_mode(&self) -> Option<IptablesMode> {
        let count = |program: &str| -> Option<usize> {
            let output = self.output(self.command(program), None).ok()?;
            output.status.success().then(|| {
                String::from_utf8_lossy(&output.stdout)
                    .lines()
                    .filter(|l| l.starts_with("-A ") && !l.contains("UWSGI-IT"))
                    .count()
            })
        };
        let legacy = count("iptables-legacy-save")?;
        let nft = count("iptables-nft-save")?;
        Some(choose_iptables_mode(legacy, nft))
    }

    /// `iptables-save`, `iptables-restore`, `nft`, `conntrack`: iptables tools in the chosen
    /// flavour.
    fn command(&self, program: &str) -> Command {
        let flavoured = match (self.iptables, program.strip_prefix("iptables-")) {
            (Some(IptablesMode::Legacy), Some(rest)) => format!("iptables-legacy-{rest}"),
            (Some(IptablesMode::Nft), Some(rest)) => format!("iptables-nft-{rest}"),
            _ => program.to_owned(),
        };
        self.scope.command(&flavoured)
    }

    /// Runs `command` with `stdin` (or none), collecting stdout and stderr, killing it after the
    /// timeout. The exit status is not checked (see [`checked`]).
    fn output(
        &self,
        mut command: Command,
        stdin: Option<&[u8]>,
    ) -> Result<Output, ForwardingError> {
        let mut child = command
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_error(&command))?;
        // Threads for the pipes, so a tool that writes a lot while it reads its input never
        // blocks on a full pipe; they end when the child's ends close (exit or kill).
        let writer = stdin.map(|input| {
            let mut pipe = child.stdin.take().expect("stdin was piped");
            let input = input.to_vec();
            // Dropping the pipe after writing closes it, which is what ends the tool's input.
            std::thread::spawn(move || pipe.write_all(&input))
        });
        let mut stdout_pipe = child.stdout.take().expect("stdout was piped");
        let mut stderr_pipe = child.stderr.take().expect("stderr was piped");
        let stdout = std::thread::spawn(move || {
            let mut bytes = Vec::new();
            stdout_pipe.read_to_end(&mut bytes).map(|_| bytes)
        });
        let stderr = std::thread::spawn(move || {
            let mut bytes = Vec::new();
            stderr_pipe.read_to_end(&mut bytes).map(|_| bytes)
        });
        let wait_error = |source| ForwardingError::Wait {
            program: describe(&command),
            source,
        };
        let waited = child.wait_timeout(self.timeout).map_err(wait_error)?;
        let status = match waited {
            Some(status) => status,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                let stderr = stderr.join().ok().and_then(Result::ok).unwrap_or_default();
                return Err(ForwardingError::TimedOut {
                    program: describe(&command),
                    timeout: self.timeout,
                    stderr: String::from_utf8_lossy(&stderr).trim().to_owned(),
                });
            }
        };
        let joined = |handle: std::thread::JoinHandle<std::io::Result<Vec<u8>>>| {
            handle
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("pipe reader panicked")))
        };
        let stdout = joined(stdout).map_err(wait_error)?;
        let stderr = joined(stderr).map_err(wait_error)?;
        if let Some(writer) = writer {
            let written = writer
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("stdin writer panicked")));
            // A tool that exits before reading all its input fails on its own terms (its
            // status and stderr say why); a broken pipe alone is not the error to report.
            if status.success() {
                written.map_err(wait_error)?;
            }
        }
        Ok(Output {
            status,
            stdout,
            stderr,
        })
    }
}

impl Default for Tools {
    /// The agent's own network namespace, the default timeout.
    fn default() -> Tools {
        CommandScope::default().into()
    }
}

impl Tools {
    /// `iptables-save -t <table>` in the chosen flavour.
    fn iptables_save(&self, table: &str) -> Result<String, ForwardingError> {
        let mut command = self.command("iptables-save");
        command.args(["-t", table]);
        let output = self.output(command.to_owned_command(), None)?;
        let output = checked(&command, output)?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `iptables-restore --noflush` with `input` on stdin (one atomic commit). `-w`: wait for
    /// the xtables lock that kube-proxy, the kubelet or a CNI plugin may hold (legacy iptables;
    /// the nft flavour takes and ignores it), within the command timeout.
    fn iptables_restore(&self, input: &str) -> Result<(), ForwardingError> {
        let mut command = self.command("iptables-restore");
        let wait = self.timeout.as_secs().saturating_sub(1).max(1);
        command.args(["-w", &wait.to_string(), "--noflush"]);
        let output = self.output(command.to_owned_command(), Some(input.as_bytes()))?;
        checked(&command, output).map(|_| ())
    }
}

impl From<CommandScope> for Tools {
    fn from(scope: CommandScope) -> Tools {
        Tools::new(scope, Tools::DEFAULT_TIMEOUT)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardingError {
    #[error("could not run {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program}: waiting for it or its output failed: {source}")]
    Wait {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} failed ({status}): {stderr}")]
    CommandFailed {
        program: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error("{program} did not finish within {timeout:?} and was killed; its stderr: {stderr:?}")]
    TimedOut {
        program: String,
        timeout: Duration,
        stderr: String,
    },
    #[error(transparent)]
    Listing(#[from] ListingError),
}

/// What the kernel holds, compared with the desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspection {
    /// `None` when the owned rules are exactly the desired ones; else the first difference.
    pub difference: Option<String>,
    /// Public addresses and forwards currently installed (empty when nothing is).
    pub installed: ForwardingRuleset,
}

/// What one [`ForwardingBackend::apply`] or [`ForwardingBackend::apply_incremental`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    /// Whether a transaction was written (false: the kernel already matched, or nothing
    /// changed since the last write).
    pub rewritten: bool,
    /// Whether what was written is only the difference from the remembered state (the event
    /// path); false for a whole-table rewrite.
    pub incremental: bool,
    /// Why the incremental transaction could not be used and the whole table was inspected
    /// (and rewritten if needed) instead: the transaction's error. `None` when it was not tried
    /// or succeeded.
    pub incremental_failure: Option<String>,
    /// Why it was rewritten: the first difference found before writing (full path), or a
    /// summary of the element changes (incremental path).
    pub difference: Option<String>,
    /// Number of forwards now programmed.
    pub forwards: usize,
    /// UDP destinations whose conntrack entries were deleted.
    pub cleared_udp_flows: Vec<UdpFlowKey>,
    /// Conntrack entries deleted in total.
    pub conntrack_entries_deleted: u64,
    /// Conntrack deletions that failed; the rules are in place regardless, and the affected UDP
    /// flows recover when their entries time out.
    pub conntrack_failures: Vec<String>,
    pub duration: Duration,
}

/// A way of programming the forwards into the kernel.
pub trait ForwardingBackend: Send + Sync {
    /// `"nftables"` or `"iptables"`, for logs and metrics.
    fn name(&self) -> &'static str;

    /// Reads the owned rules and compares them with `desired`.
    fn inspect(&self, desired: &ForwardingRuleset) -> Result<Inspection, ForwardingError>;

    /// Makes the kernel match `desired`: nothing is written when it already does; otherwise
    /// one atomic replacement of the owned rules, then conntrack cleanup of changed UDP forwards.
    /// Remembers `desired` for [`ForwardingBackend::apply_incremental`] once the kernel holds it.
    fn apply(&self, desired: &ForwardingRuleset) -> Result<ApplyReport, ForwardingError>;

    /// The event path: writes only the difference between the remembered state and `desired`,
    /// as one atomic transaction, without reading the kernel; falls back to
    /// [`ForwardingBackend::apply`] when nothing is remembered or the transaction fails.
    fn apply_incremental(
        &self,
        desired: &ForwardingRuleset,
    ) -> Result<ApplyReport, ForwardingError>;

    /// Drift detection for the periodic resync.
    fn is_in_sync(&self, desired: &ForwardingRuleset) -> Result<bool, ForwardingError> {
        Ok(self.inspect(desired)?.difference.is_none())
    }

    /// Removes everything this backend owns in the kernel, in one transaction; true when there
    /// was something to remove. For the backend not in use (an earlier one's leftovers) and for
    /// `agent --cleanup`.
    fn remove_all(&self) -> Result<bool, ForwardingError>;
}

fn spawn_error(command: &Command) -> impl FnOnce(std::io::Error) -> ForwardingError + '_ {
    move |source| ForwardingError::Spawn {
        program: describe(command),
        source,
    }
}

fn describe(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn checked(command: &Command, output: Output) -> Result<Output, ForwardingError> {
    if output.status.success() {
        return Ok(output);
    }
    Err(ForwardingError::CommandFailed {
        program: describe(command),
        status: output.status,
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
    })
}

/// The ruleset a backend last wrote or confirmed in the kernel (`None`: unknown, so the next
/// change goes through a full inspection). Its lock also serialises the applies of one backend.
#[derive(Debug, Default)]
struct Memory(Mutex<Option<ForwardingRuleset>>);

impl Memory {
    fn lock(&self) -> MutexGuard<'_, Option<ForwardingRuleset>> {
        self.0.lock().unwrap_or_else(|poisoned| {
            // An apply panicked midway: what the kernel holds is unknown.
            let mut guard = poisoned.into_inner();
            *guard = None;
            self.0.clear_poison();
            guard
        })
    }
}

fn empty_report(desired: &ForwardingRuleset) -> ApplyReport {
    ApplyReport {
        rewritten: false,
        incremental: false,
        incremental_failure: None,
        difference: None,
        forwards: desired.forwards().len(),
        cleared_udp_flows: Vec::new(),
        conntrack_entries_deleted: 0,
        conntrack_failures: Vec::new(),
        duration: Duration::ZERO,
    }
}

/// The shared part of `apply`: skip when in sync, else write and clean conntrack; remember
/// `desired` once the kernel is known to hold it.
fn apply_with(
    tools: &Tools,
    remembered: &mut Option<ForwardingRuleset>,
    desired: &ForwardingRuleset,
    inspection: Inspection,
    write: impl FnOnce() -> Result<(), ForwardingError>,
    started: Instant,
) -> Result<ApplyReport, ForwardingError> {
    let mut report = empty_report(desired);
    report.difference = inspection.difference.clone();
    if inspection.difference.is_some() {
        // Unknown until the write is confirmed: a failed write must not leave a stale memory.
        *remembered = None;
        write()?;
        report.rewritten = true;
        let stale = stale_udp_flows(&inspection.installed, desired);
        clear_udp_flows(tools, stale, &mut report);
    }
    *remembered = Some(desired.clone());
    report.duration = started.elapsed();
    Ok(report)
}

/// The shared part of `apply_incremental`. `write_difference` gets the remembered ruleset and
/// the (non-empty) diff and writes them as one transaction; `full` is the backend's `apply`.
fn apply_incremental_with(
    tools: &Tools,
    remembered: &mut Option<ForwardingRuleset>,
    desired: &ForwardingRuleset,
    write_difference: impl FnOnce(&ForwardingRuleset, &RulesetDiff) -> Result<(), ForwardingError>,
    full: impl FnOnce(&mut Option<ForwardingRuleset>) -> Result<ApplyReport, ForwardingError>,
) -> Result<ApplyReport, ForwardingError> {
    let started = Instant::now();
    let Some(previous) = remembered.take() else {
        return full(remembered);
    };
    let diff = RulesetDiff::between(&previous, desired);
    let mut report = empty_report(desired);
    if diff.is_empty() {
        *remembered = Some(desired.clone());
        report.duration = started.elapsed();
        return Ok(report);
    }
    if let Err(error) = write_difference(&previous, &diff) {
        // The transaction is atomic, so nothing of it was applied; what the kernel holds is
        // no longer known (that is usually why it failed), so inspect and rewrite.
        let mut report = full(remembered)?;
        report.incremental_failure = Some(error.to_string());
        report.duration = started.elapsed();
        return Ok(report);
    }
    *remembered = Some(desired.clone());
    report.rewritten = true;
    report.incremental = true;
    report.difference = Some(diff.to_string());
    clear_udp_flows(tools, stale_udp_flows(&previous, desired), &mut report);
    report.duration = started.elapsed();
    Ok(report)
}

/// Up to this many stale UDP destinations are deleted directly (one `conntrack -D` each);
/// more are first checked against one `conntrack -L`, so a full resync of thousands of UDP
/// forwards costs one listing plus one deletion per destination that really has entries.
const DIRECT_CONNTRACK_DELETIONS: usize = 4;

fn clear_udp_flows(tools: &Tools, stale: Vec<UdpFlowKey>, report: &mut ApplyReport) {
    let with_entries = if stale.len() <= DIRECT_CONNTRACK_DELETIONS {
        stale.clone()
    } else {
        match udp_destinations_with_entries(tools) {
            Ok(present) => stale
                .iter()
                .filter(|flow| present.contains(flow))
                .copied()
                .collect(),
            Err(error) => {
                report.conntrack_failures.push(error.to_string());
                stale.clone()
            }
        }
    };
    for flow in with_entries {
        match delete_udp_conntrack(tools, flow.public_address, flow.public_port) {
            Ok(deleted) => report.conntrack_entries_deleted += deleted,
            Err(error) => report.conntrack_failures.push(error.to_string()),
        }
    }
    report.cleared_udp_flows = stale;
}

/// The original destinations of all UDP conntrack entries (`conntrack -L -p udp`).
pub fn udp_destinations_with_entries(
    tools: &Tools,
) -> Result<BTreeSet<UdpFlowKey>, ForwardingError> {
    let mut command = tools.command("conntrack");
    command.args(["-L", "-p", "udp"]);
    let output = tools.output(command.to_owned_command(), None)?;
    let output = checked(&command, output)?;
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            // The first dst=/dport= of a line belong to the original direction.
            let field = |name: &str| {
                line.split_whitespace()
                    .find_map(|word| word.strip_prefix(name))
            };
            Some(UdpFlowKey {
                public_address: field("dst=")?.parse().ok()?,
                public_port: field("dport=")?.parse().ok()?,
            })
        })
        .collect())
}

/// `conntrack -D -p udp --orig-dst <address> --orig-port-dst <port>`; returns how many entries
/// went. conntrack exits 1 when nothing matched ("0 flow entries have been deleted"), which is
/// success here.
pub fn delete_udp_conntrack(
    tools: &Tools,
    public_address: Ipv4Addr,
    public_port: u16,
) -> Result<u64, ForwardingError> {
    let mut command = tools.command("conntrack");
    command.args([
        "-D",
        "-p",
        "udp",
        "--orig-dst",
        &public_address.to_string(),
        "--orig-port-dst",
        &public_port.to_string(),
    ]);
    let output = tools.output(command.to_owned_command(), None)?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let deleted = stderr.lines().find_map(|line| {
        let (_, rest) = line.split_once("): ")?;
        let count = rest.strip_suffix(" flow entries have been deleted.")?;
        count.trim().parse::<u64>().ok()
    });
    match deleted {
        Some(count) => Ok(count),
        None => checked(&command, output).map(|_| 0),
    }
}

/// Owns `table ip uwsgi_it`; writes it whole, or only its changed elements, with `nft -j -f -`.
#[derive(Debug, Default)]
pub struct NftBackend {
    tools: Tools,
    memory: Memory,
    /// The normalised rendering of the last ruleset inspected against: as costly to make as a
    /// listing is to read, and the same for every resync while nothing changes.
    expected: Mutex<Option<(ForwardingRuleset, nft::ExpectedListing)>>,
}

impl NftBackend {
    pub fn new(tools: impl Into<Tools>) -> NftBackend {
        NftBackend {
            tools: tools.into(),
            memory: Memory::default(),
            expected: Mutex::new(None),
        }
    }

    /// `nft -j -f -` with `json` on stdin.
    fn run_transaction(&self, json: &str) -> Result<(), ForwardingError> {
        let mut command = self.tools.command("nft");
        command.args(["-j", "-f", "-"]);
        let output = self
            .tools
            .output(command.to_owned_command(), Some(json.as_bytes()))?;
        checked(&command, output).map(|_| ())
    }

    fn apply_locked(
        &self,
        remembered: &mut Option<ForwardingRuleset>,
        desired: &ForwardingRuleset,
    ) -> Result<ApplyReport, ForwardingError> {
        let started = Instant::now();
        let inspection = self.inspect(desired)?;
        apply_with(
            &self.tools,
            remembered,
            desired,
            inspection,
            || self.run_transaction(&nft::transaction_json(desired)),
            started,
        )
    }

    /// `nft -j list table ip uwsgi_it`, or `None` when the table does not exist.
    fn listing(&self) -> Result<Option<String>, ForwardingError> {
        let mut command = self.tools.command("nft");
        command.args(["-j", "list", "table", "ip", nft::TABLE]);
        let output = self.tools.output(command.to_owned_command(), None)?;
        if !output.status.success()
            && String::from_utf8_lossy(&output.stderr).contains("No such file or directory")
        {
            return Ok(None);
        }
        let output = checked(&command, output)?;
        Ok(Some(String::from_utf8_lossy(&output.stdout).into_owned()))
    }

    /// Writes the whole table in one transaction, without looking at what is installed.
    pub fn write(&self, desired: &ForwardingRuleset) -> Result<(), ForwardingError> {
        let mut remembered = self.memory.lock();
        *remembered = None;
        self.run_transaction(&nft::transaction_json(desired))?;
        *remembered = Some(desired.clone());
        Ok(())
    }
}

/// `Command` is not `Clone`; rebuilding from the parts keeps call sites readable.
trait ToOwnedCommand {
    fn to_owned_command(&mut self) -> Command;
}

impl ToOwnedCommand for Command {
    fn to_owned_command(&mut self) -> Command {
        let mut owned = Command::new(self.get_program());
        owned.args(self.get_args());
        owned
    }
}

impl ForwardingBackend for NftBackend {
    fn name(&self) -> &'static str {
        "nftables"
    }

    fn remove_all(&self) -> Result<bool, ForwardingError> {
        let mut remembered = self.memory.lock();
        *remembered = None;
        if self.listing()?.is_none() {
            return Ok(false);
        }
        self.run_transaction(&nft::cleanup_json())?;
        Ok(true)
    }

    fn inspect(&self, desired: &ForwardingRuleset) -> Result<Inspection, ForwardingError> {
        let listing = self.listing()?;
        let mut cached = self.expected.lock().unwrap_or_else(|p| p.into_inner());
        if cached
            .as_ref()
            .is_none_or(|(for_ruleset, _)| for_ruleset != desired)
        {
            *cached = Some((desired.clone(), nft::ExpectedListing::of(desired)));
        }
        let (_, expected) = cached.as_ref().expect("just filled");
        let inspection = nft::inspect_listing_against(desired, expected, listing.as_deref())?;
        Ok(Inspection {
            difference: inspection.difference,
            installed: inspection.installed,
        })
    }

    fn apply(&self, desired: &ForwardingRuleset) -> Result<ApplyReport, ForwardingError> {
        self.apply_locked(&mut self.memory.lock(), desired)
    }

    fn apply_incremental(
        &self,
        desired: &ForwardingRuleset,
    ) -> Result<ApplyReport, ForwardingError> {
        apply_incremental_with(
            &self.tools,
            &mut self.memory.lock(),
            desired,
            |_, diff| match nft::incremental_transaction_json(diff) {
                Some(json) => self.run_transaction(&json),
                None => Ok(()),
            },
            |remembered| self.apply_locked(remembered, desired),
        )
    }
}

/// Owns the `UWSGI-IT-*` chains of table `nat`; writes them with `iptables-restore --noflush`,
/// whole or only the rules that changed.
#[derive(Debug, Default)]
pub struct IptablesBackend {
    tools: Tools,
    memory: Memory,
}

impl IptablesBackend {
    pub fn new(tools: impl Into<Tools>) -> IptablesBackend {
        IptablesBackend {
            tools: tools.into(),
            memory: Memory::default(),
        }
    }

    fn restore(&self, input: &str) -> Result<(), ForwardingError> {
        self.tools.iptables_restore(input)
    }

    fn apply_locked(
        &self,
        remembered: &mut Option<ForwardingRuleset>,
        desired: &ForwardingRuleset,
    ) -> Result<ApplyReport, ForwardingError> {
        let started = Instant::now();
        let (inspection, missing_jumps) = self.inspect_with_jumps(desired)?;
        apply_with(
            &self.tools,
            remembered,
            desired,
            inspection,
            || self.restore(&iptables::restore_input(desired, &missing_jumps)),
            started,
        )
    }

    fn save(&self) -> Result<String, ForwardingError> {
        self.tools.iptables_save("nat")
    }

    fn inspect_with_jumps(
        &self,
        desired: &ForwardingRuleset,
    ) -> Result<(Inspection, Vec<JumpRule>), ForwardingError> {
        let inspection = iptables::inspect_save(desired, &self.save()?);
        Ok((
            Inspection {
                difference: inspection.difference,
                installed: inspection.installed,
            },
            inspection.missing_jumps,
        ))
    }

    /// Replaces the owned chains and adds `missing_jumps`, in one restore.
    pub fn write(
        &self,
        desired: &ForwardingRuleset,
        missing_jumps: &[JumpRule],
    ) -> Result<(), ForwardingError> {
        let mut remembered = self.memory.lock();
        *remembered = None;
        self.restore(&iptables::restore_input(desired, missing_jumps))?;
        // The jumps may still be missing (only `missing_jumps` were added), but the owned chains
        // hold exactly `desired`, which is what the incremental path builds on.
        *remembered = Some(desired.clone());
        Ok(())
    }
}

impl ForwardingBackend for IptablesBackend {
    fn name(&self) -> &'static str {
        "iptables"
    }

    fn remove_all(&self) -> Result<bool, ForwardingError> {
        let mut remembered = self.memory.lock();
        *remembered = None;
        match iptables::cleanup_input(&self.save()?) {
            Some(input) => self.restore(&input).map(|()| true),
            None => Ok(false),
        }
    }

    fn inspect(&self, desired: &ForwardingRuleset) -> Result<Inspection, ForwardingError> {
        Ok(self.inspect_with_jumps(desired)?.0)
    }

    fn apply(&self, desired: &ForwardingRuleset) -> Result<ApplyReport, ForwardingError> {
        self.apply_locked(&mut self.memory.lock(), desired)
    }

    fn apply_incremental(
        &self,
        desired: &ForwardingRuleset,
    ) -> Result<ApplyReport, ForwardingError> {
        apply_incremental_with(
            &self.tools,
            &mut self.memory.lock(),
            desired,
            |previous, _| match iptables::incremental_restore_input(previous, desired) {
                Some(input) => self.restore(&input),
                None => Ok(()),
            },
            |remembered| self.apply_locked(remembered, desired),
        )
    }
}

/// The accept of the agent's forwarded connections in table `filter` (see
/// `iptables::FORWARD_ACCEPT_CHAIN`), kept next to whichever backend does the DNAT: a host
/// whose `FORWARD` policy drops (Docker, ufw) would otherwise drop every forward.
#[derive(Debug, Default)]
pub struct ForwardAccept {
    tools: Tools,
    /// The public addresses last written or confirmed.
    remembered: Mutex<Option<Vec<Ipv4Addr>>>,
}

impl ForwardAccept {
    pub fn new(tools: impl Into<Tools>) -> ForwardAccept {
        ForwardAccept {
            tools: tools.into(),
            remembered: Mutex::new(None),
        }
    }

    fn save(&self) -> Result<String, ForwardingError> {
        self.tools.iptables_save("filter")
    }

    fn restore(&self, input: &str) -> Result<(), ForwardingError> {
        self.tools.iptables_restore(input)
    }

    /// Makes the accept cover exactly `addresses`. `full` reads the kernel (repairing drift);
    /// otherwise nothing runs unless the addresses changed since the last write. True when it
    /// wrote. A host without iptables has no `FORWARD` chain to open: an error of kind
    /// [`ForwardingError::Spawn`], which callers may ignore.
    pub fn ensure(&self, addresses: &[Ipv4Addr], full: bool) -> Result<bool, ForwardingError> {
        let mut remembered = self.remembered.lock().unwrap_or_else(|p| p.into_inner());
        if !full && remembered.as_deref() == Some(addresses) {
            return Ok(false);
        }
        *remembered = None;
        let written = match iptables::forward_accept_input(addresses, &self.save()?) {
            Some(input) => {
                self.restore(&input)?;
                true
            }
            None => false,
        };
        *remembered = Some(addresses.to_vec());
        Ok(written)
    }

    /// Removes the chain and its jump (`agent --cleanup`); true when there was one.
    pub fn remove(&self) -> Result<bool, ForwardingError> {
        *self.remembered.lock().unwrap_or_else(|p| p.into_inner()) = None;
        match iptables::forward_accept_cleanup_input(&self.save()?) {
            Some(input) => self.restore(&input).map(|()| true),
            None => Ok(false),
        }
    }
}
