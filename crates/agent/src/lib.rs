//! The node agent: makes the node match the containers and port mappings assigned to it.

pub mod forwarding;
