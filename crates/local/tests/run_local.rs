//! The local run as a user runs it: `hack/run-local.sh` (with the binary and images this test
//! suite already built) must bring up the real cluster, reach the line proving the app answered
//! through the public port, stop on SIGINT with exit status 0, and leave nothing behind: no
//! process, mount, cgroup, network namespace or directory of the cluster. Needs root.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use uwsgi_it_testbed::real_cluster::leftovers;

/// From start to the answer: the cluster, the chart and the first Pods.
const START_PATIENCE: Duration = Duration::from_secs(400);
/// From SIGINT to exit.
const STOP_PATIENCE: Duration = Duration::from_secs(90);
const APP_ANSWERED: &str = "[local] app answered:";

/// Stops the run if the test fails before it exits; the cluster's watchdog cleans up after it.
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

#[test]
fn the_local_run_reaches_app_answered_and_leaves_nothing_after_ctrl_c() {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../hack/run-local.sh");
    let started = Instant::now();
    let mut child = Command::new("bash")
        .arg(&script)
        .env("UWSGI_IT_LOCAL_BIN", env!("CARGO_BIN_EXE_uwsgi-it-local"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("hack/run-local.sh starts");
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

    let mut kubeconfig: Option<PathBuf> = None;
    let mut answered = None;
    while answered.is_none() || kubeconfig.is_none() {
        let left = START_PATIENCE.saturating_sub(started.elapsed());
        let line = match receive.recv_timeout(left.min(Duration::from_millis(500))) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                assert!(
                    !left.is_zero(),
                    "no `{APP_ANSWERED}` line within {START_PATIENCE:?}"
                );
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = running.0.as_mut().unwrap().wait().unwrap();
                panic!("the local run ended ({status}) before the app answered");
            }
        };
        if let Some(path) = line.trim().strip_prefix("export KUBECONFIG=") {
            kubeconfig = Some(PathBuf::from(path));
        }
        if line.starts_with(APP_ANSWERED) {
            assert!(line.contains("hello from hydra"), "{line}");
            assert!(line.contains("203.0.113.10:9000"), "{line}");
            answered = Some(started.elapsed());
        }
    }
    eprintln!("the app answered {:?} after start", answered.unwrap());
    assert!(
        kubeconfig.unwrap().is_file(),
        "the printed kubeconfig exists"
    );
    assert!(
        !leftovers().is_empty(),
        "the cluster's parts are seen while it runs (or the leftover check sees nothing)"
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
    assert_eq!(
        leftovers(),
        Vec::<String>::new(),
        "left behind after Ctrl-C"
    );
}
