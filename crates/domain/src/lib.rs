//! The decisions of uwsgi-it-operator as pure functions: data in, decisions out.
//!
//! Nothing here talks to the Kubernetes API, the network or the file system, so every rule can
//! be tested exhaustively and property-tested for its invariants. The controller and the agent
//! translate API objects into these inputs and carry out the decisions.

pub mod address;
pub mod capacity;
pub mod config;
pub mod distro;
pub mod forwarding;
pub mod identity;
pub mod paths;
pub mod ports;
pub mod ssh_keys;
