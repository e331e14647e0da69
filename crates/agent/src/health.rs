//! `/healthz` from the age of the last successful forwarding sync, as kube-proxy does: a sync
//! runs at least every `portForward.resyncPeriod`, so when none has succeeded for
//! `portForward.maxSyncAge` the loop is stuck or its tools keep failing (a hung `nft` is killed
//! at `commandTimeout`, and the sync counts as failed), and the kubelet should restart the agent.
//! The rules already in the kernel stay while it does.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct SyncHealth {
    /// Start counts as the first success, so an agent gets `max_age` to make its first sync.
    last_success: Mutex<Instant>,
    max_age: Duration,
}

impl SyncHealth {
    pub fn new(max_age: Duration) -> SyncHealth {
        SyncHealth {
            last_success: Mutex::new(Instant::now()),
            max_age,
        }
    }

    /// A sync succeeded now.
    pub fn succeeded(&self) {
        *self.last_success.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    /// Healthy, or why not.
    pub fn check(&self) -> Result<(), String> {
        let last = *self.last_success.lock().unwrap_or_else(|p| p.into_inner());
        verdict(last.elapsed(), self.max_age)
    }
}

fn verdict(age: Duration, max_age: Duration) -> Result<(), String> {
    if age <= max_age {
        Ok(())
    } else {
        Err(format!(
            "no successful forwarding sync for {}s (portForward.maxSyncAge is {}s)",
            age.as_secs(),
            max_age.as_secs()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthy_until_the_last_success_is_older_than_the_bound() {
        let bound = Duration::from_secs(140);
        assert!(verdict(Duration::ZERO, bound).is_ok());
        assert!(verdict(bound, bound).is_ok());
        let why = verdict(Duration::from_secs(141), bound).unwrap_err();
        assert_eq!(
            why,
            "no successful forwarding sync for 141s (portForward.maxSyncAge is 140s)"
        );
    }

    #[test]
    fn a_success_resets_the_age() {
        let health = SyncHealth::new(Duration::from_millis(30));
        assert!(health.check().is_ok());
        std::thread::sleep(Duration::from_millis(40));
        assert!(health.check().is_err());
        health.succeeded();
        assert!(health.check().is_ok());
    }
}
