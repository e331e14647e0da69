//! Named network namespaces of one local run: `uwsgi-local-<role>-<pid>`, so parallel runs never
//! collide and a run killed without cleaning up (SIGKILL) is recognisable by its dead pid and
//! removed by the next run.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// Prefix of every network namespace a local run creates.
pub const PREFIX: &str = "uwsgi-local-";

/// A network namespace deleted on drop.
#[derive(Debug)]
pub struct NamedNetns {
    name: String,
}

impl NamedNetns {
    /// Creates `uwsgi-local-<role>-<pid>` with its loopback up.
    pub fn create(role: &str) -> Result<NamedNetns> {
        let name = format!("{PREFIX}{role}-{}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let netns = NamedNetns { name };
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <name> args...`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        run(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// One line sent over a fresh TCP connection from inside this namespace, and the reply line.
    pub fn tcp_exchange(
        &self,
        to: SocketAddrV4,
        message: &str,
        timeout: Duration,
    ) -> io::Result<String> {
        let path = Path::new("/run/netns").join(&self.name);
        // Sockets keep the namespace they were made in: connect on a thread that joined it.
        let stream = std::thread::spawn(move || -> io::Result<TcpStream> {
            let file = std::fs::File::open(&path)?;
            // SAFETY: setns only reads the descriptor, which `file` keeps open for the call, and
            // changes the namespace of this short-lived thread alone.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            TcpStream::connect_timeout(&to.into(), timeout)
        })
        .join()
        .map_err(|_| io::Error::other("connecting thread panicked"))??;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut writer = stream.try_clone()?;
        writer.write_all(format!("{message}\n").as_bytes())?;
        let mut reply = String::new();
        if BufReader::new(stream).read_line(&mut reply)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed without a reply",
            ));
        }
        Ok(reply.trim_end().to_owned())
    }
}

impl Drop for NamedNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .output();
    }
}

/// Network namespaces of earlier runs whose process no longer exists (killed with SIGKILL),
/// deleted; returns their names.
pub fn remove_stale() -> Vec<String> {
    let Ok(output) = Command::new("ip").args(["netns", "list"]).output() else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if !name.starts_with(PREFIX) {
            continue;
        }
        let pid = name.rsplit('-').next().and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            let _ = Command::new("ip").args(["netns", "delete", name]).output();
            removed.push(name.to_owned());
        }
    }
    removed
}

/// Runs `command`; fails with its stderr unless it exits 0.
pub fn run(command: &mut Command) -> Result<()> {
    let output = command
        .output()
        .with_context(|| format!("starting {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}
