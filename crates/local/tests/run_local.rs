//! `uwsgi-it-local` as a user runs it: started as a child, it must reach the line proving the
//! forwarded port answered, stop on SIGINT with exit status 0, and leave nothing of its own
//! behind: no etcd or kube-apiserver, no `uwsgi-local-*-<pid>` or Pod network namespace, no
//! temporary directory. Needs root.
//!
//! Everything it looks for carries the child's pid, so other tests and local runs in parallel
//! are neither disturbed nor mistaken for leftovers.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// From start to the answered port: the control plane's start dominates (binaries cached).
const START_PATIENCE: Duration = Duration::from_secs(300);
/// From SIGINT to exit.
const STOP_PATIENCE: Duration = Duration::from_secs(60);
const PORT_ANSWERED: &str = "[local] port answered:";

/// Kills the child if the test fails before it exits (its processes die with it).
struct Running(Option<Child>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            // SAFETY: kill has no memory-safety preconditions; the pid is our own child's.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGINT);
            }
            let deadline = Instant::now() + STOP_PATIENCE;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Processes whose parent is `pid`: (pid, command name).
fn children_of(pid: u32) -> Vec<(u32, String)> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...; comm may hold spaces, so split after the last ')'.
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let comm = head.split_once('(').map(|(_, c)| c).unwrap_or_default();
        let ppid = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok());
        if ppid == Some(pid) {
            children.push((child, comm.to_owned()));
        }
    }
    children
}

/// True while `pid` exists and still runs `comm` (not a reused pid, not a reaped zombie).
fn still_runs(pid: u32, comm: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.contains(&format!("({comm})"))
            && stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                != Some("Z")
    })
}

fn network_namespaces() -> Vec<String> {
    let output = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_local_run_answers_on_the_forwarded_port_and_cleans_up_after_sigint() {
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_uwsgi-it-local"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("uwsgi-it-local starts");
    let pid = child.id();
    let stdout = child.stdout.take().unwrap();
    let mut running = Running(Some(child));

    // Every line goes to the test's output (shown when it fails) and to the waiting loop.
    let (lines, receive) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("{line}");
            if lines.send(line).is_err() {
                break;
            }
        }
    });

    let mut work_dir: Option<PathBuf> = None;
    let mut kubeconfig: Option<PathBuf> = None;
    let mut answered = None;
    let mut spawned = Vec::new();
    while answered.is_none() || kubeconfig.is_none() {
        let left = START_PATIENCE.saturating_sub(started.elapsed());
        let line = match receive.recv_timeout(left.min(Duration::from_millis(500))) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                assert!(
                    !left.is_zero(),
                    "no `{PORT_ANSWERED}` line within {START_PATIENCE:?}"
                );
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = running.0.as_mut().unwrap().wait().unwrap();
                panic!("uwsgi-it-local ended ({status}) before its port answered");
            }
        };
        // The control plane's processes, seen while they run.
        for (child, comm) in children_of(pid) {
            if !spawned.contains(&(child, comm.clone())) {
                spawned.push((child, comm));
            }
        }
        if let Some(dir) = line.strip_prefix("[local] work directory: ") {
            work_dir = Some(PathBuf::from(dir));
        }
        if let Some(path) = line.trim().strip_prefix("export KUBECONFIG=") {
            kubeconfig = Some(PathBuf::from(path));
        }
        if line.starts_with(PORT_ANSWERED) {
            assert!(
                line.contains("got \"hello hydra from 203.0.113.100\""),
                "{line}"
            );
            answered = Some(started.elapsed());
        }
    }
    let answered = answered.unwrap();
    eprintln!("the forwarded port answered {answered:?} after start");
    let work_dir = work_dir.expect("the work directory was printed");
    let kubeconfig = kubeconfig.expect("export KUBECONFIG was printed");
    assert!(work_dir.is_dir());
    assert!(kubeconfig.is_file());
    let control_plane: Vec<_> = spawned
        .iter()
        .filter(|(_, comm)| comm == "etcd" || comm == "kube-apiserver")
        .cloned()
        .collect();
    assert_eq!(
        control_plane.len(),
        2,
        "etcd and kube-apiserver run as children: {spawned:?}"
    );
    let suffix = format!("-{pid}");
    let mine = |names: &[String]| -> Vec<String> {
        names
            .iter()
            .filter(|n| {
                (n.starts_with("uwsgi-local-") && n.ends_with(&suffix))
                    || n.starts_with(&format!("uit-pod-{pid}-"))
            })
            .cloned()
            .collect()
    };
    let namespaces = mine(&network_namespaces());
    assert!(
        namespaces.len() >= 3 + 2,
        "client, two nodes and the Pods: {namespaces:?}"
    );

    // SAFETY: kill has no memory-safety preconditions; the pid is our own running child's.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGINT) }, 0);
    let stopping = Instant::now();
    let status = loop {
        if let Some(status) = running.0.as_mut().unwrap().try_wait().unwrap() {
            break status;
        }
        assert!(
            stopping.elapsed() < STOP_PATIENCE,
            "still running {STOP_PATIENCE:?} after SIGINT"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    running.0 = None;
    reader.join().unwrap();
    assert!(status.success(), "exit status after SIGINT: {status}");
    eprintln!("stopped {:?} after SIGINT", stopping.elapsed());

    for (process, comm) in &control_plane {
        assert!(
            !still_runs(*process, comm),
            "{comm} ({process}) outlived the run"
        );
    }
    assert_eq!(mine(&network_namespaces()), Vec::<String>::new());
    assert!(!work_dir.exists(), "{} left behind", work_dir.display());
    assert!(!kubeconfig.exists(), "{} left behind", kubeconfig.display());
    let testbed = std::env::temp_dir().join("uwsgi-it-testbed");
    let leftovers: Vec<_> = std::fs::read_dir(&testbed)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("{pid}-")))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        leftovers.is_empty(),
        "control-plane directories left in {}: {leftovers:?}",
        Path::new(&testbed).display()
    );
}
