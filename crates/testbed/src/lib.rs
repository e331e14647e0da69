//! Test support: used by the tests, the local-run command and the benchmarks, never by the
//! programs themselves.

pub mod alerts;
pub mod chart;
pub mod control_plane;
pub mod fault_proxy;
pub mod health;
pub mod kubelet;
pub mod netns;
pub mod real_cluster;
pub mod servers;
pub mod ssh_keys;
