//! The node's own listening sockets, so that a forward never takes a port a service of the node
//! already serves (an API server, an exporter, something the supplier started by hand that no
//! `reservedPorts` entry names).
//!
//! A forward matches packets to the public address, so the sockets it would take are those
//! bound to that address or to a wildcard (`0.0.0.0`, `::`, which also receives IPv4 unless
//! `IPV6_V6ONLY`, and which `/proc` does not show, so it counts). Sockets bound to loopback or
//! to another address of the node do not see that traffic and do not count.
//!
//! The sockets come from `/proc/net/{tcp,tcp6,udp,udp6}` of the node's network namespace (read
//! from a thread inside it, through `/proc/thread-self`): TCP sockets in `LISTEN`, UDP sockets
//! bound without a peer. Parsing is pure and tested below.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use uwsgi_it_domain::forwarding::Protocol;

use crate::address::NetworkNamespace;

/// One listening socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Listener {
    pub protocol: Protocol,
    pub address: IpAddr,
    pub port: u16,
}

impl std::fmt::Display for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.address {
            IpAddr::V4(a) => write!(f, "{} {a}:{}", self.protocol, self.port),
            IpAddr::V6(a) => write!(f, "{} [{a}]:{}", self.protocol, self.port),
        }
    }
}

/// `st` of a TCP socket in `LISTEN` (`include/net/tcp_states.h`).
const TCP_LISTEN: &str = "0A";
/// `st` of an unconnected UDP socket (`TCP_CLOSE`, reused by UDP).
const UDP_UNCONNECTED: &str = "07";

/// The listening sockets of one `/proc/net/{tcp,tcp6,udp,udp6}` text. Lines that do not parse
/// are skipped (the format has been stable since Linux 2.6, but a reader must not fail on a new
/// column).
pub fn parse_proc_net(text: &str, protocol: Protocol) -> Vec<Listener> {
    let wanted = match protocol {
        Protocol::Tcp => TCP_LISTEN,
        Protocol::Udp => UDP_UNCONNECTED,
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace().skip(1);
            let local = fields.next()?;
            let remote = fields.next()?;
            let state = fields.next()?;
            if state != wanted {
                return None;
            }
            let (address, port) = parse_endpoint(local)?;
            // A UDP socket with a peer (connect()ed) only receives from that peer.
            if protocol == Protocol::Udp && parse_endpoint(remote)?.1 != 0 {
                return None;
            }
            Some(Listener {
                protocol,
                address,
                port,
            })
        })
        .collect()
}

/// `0100007F:1F90` (IPv4: one native-endian 32-bit word) or 32 hex digits (IPv6: four
/// native-endian 32-bit words), then the port in hex.
fn parse_endpoint(text: &str) -> Option<(IpAddr, u16)> {
    let (address, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |hex: &str| u32::from_str_radix(hex, 16).ok().map(u32::swap_bytes);
    let address = match address.len() {
        8 => IpAddr::V4(Ipv4Addr::from(native_word(word(address)?))),
        32 => {
            let mut octets = [0u8; 16];
            for (i, chunk) in octets.chunks_mut(4).enumerate() {
                let hex = address.get(i * 8..i * 8 + 8)?;
                chunk.copy_from_slice(&native_word(word(hex)?).to_be_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some((address, port))
}

/// The kernel prints each 32-bit word of an address as the host stores it; `word` above read it
/// as big-endian and swapped it, which is right on little-endian hosts; this undoes the swap on
/// big-endian ones.
fn native_word(swapped: u32) -> u32 {
    if cfg!(target_endian = "little") {
        swapped
    } else {
        swapped.swap_bytes()
    }
}

/// The listener that a forward of `protocol`/`port` on `public` would take traffic from, if any.
pub fn blocking(
    listeners: &BTreeSet<Listener>,
    protocol: Protocol,
    port: u16,
    public: Ipv4Addr,
) -> Option<&Listener> {
    listeners.iter().find(|l| {
        l.protocol == protocol
            && l.port == port
            && match l.address {
                IpAddr::V4(a) => a.is_unspecified() || a == public,
                IpAddr::V6(a) => a.is_unspecified() || a.to_ipv4_mapped() == Some(public),
            }
    })
}

/// Reads the node's listening sockets.
pub fn read(netns: &NetworkNamespace) -> std::io::Result<BTreeSet<Listener>> {
    netns.run_blocking(|| {
        let mut all = BTreeSet::new();
        for (file, protocol) in [
            ("tcp", Protocol::Tcp),
            ("tcp6", Protocol::Tcp),
            ("udp", Protocol::Udp),
            ("udp6", Protocol::Udp),
        ] {
            let path = format!("/proc/thread-self/net/{file}");
            match std::fs::read_to_string(&path) {
                Ok(text) => all.extend(parse_proc_net(&text, protocol)),
                // No IPv6 on this node: nothing listens there.
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => {
                    return Err(std::io::Error::new(
                        error.kind(),
                        format!("reading {path}: {error}"),
                    ));
                }
            }
        }
        Ok(all)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:192B 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 0100007F:0CEA 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 100 0 0 10 0
   2: 0A7100CB:2328 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3 1 0000000000000000 100 0 0 10 0
   3: 0A7100CB:D3E2 0B7100CB:1F90 01 00000000:00000000 00:00000000 00000000     0        0 4 1 0000000000000000 20 4 30 10 -1
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5 1 0000000000000000 100 0 0 10 0
   1: 0000000000000000FFFF00000A7100CB:1F91 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 6 1 0000000000000000 100 0 0 10 0
   2: 00000000000000000000000001000000:1F92 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 7 1 0000000000000000 100 0 0 10 0
";
    const UDP: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  100: 00000000:2118 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 8 2 0000000000000000 0
  101: 0A7100CB:E28C 0B7100CB:0035 01 00000000:00000000 00:00000000 00000000     0        0 9 2 0000000000000000 0
  102: 0A7100CB:9C40 0B7100CB:0035 07 00000000:00000000 00:00000000 00000000     0        0 9 2 0000000000000000 0
";

    fn public() -> Ipv4Addr {
        "203.0.113.10".parse().unwrap()
    }

    #[test]
    fn tcp_listeners_are_read_and_connections_ignored() {
        let listeners = parse_proc_net(TCP, Protocol::Tcp);
        let seen: Vec<String> = listeners.iter().map(ToString::to_string).collect();
        assert_eq!(
            seen,
            [
                "tcp 0.0.0.0:6443",
                "tcp 127.0.0.1:3306",
                "tcp 203.0.113.10:9000"
            ]
        );
        let v6: Vec<String> = parse_proc_net(TCP6, Protocol::Tcp)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            v6,
            [
                "tcp [::]:8080",
                "tcp [::ffff:203.0.113.10]:8081",
                "tcp [::1]:8082"
            ]
        );
    }

    #[test]
    fn udp_sockets_without_a_peer_are_listeners() {
        let seen: Vec<String> = parse_proc_net(UDP, Protocol::Udp)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(seen, ["udp 0.0.0.0:8472"]);
    }

    #[test]
    fn only_wildcard_and_public_address_sockets_block_a_forward() {
        let all: BTreeSet<Listener> = [TCP, TCP6]
            .iter()
            .flat_map(|t| parse_proc_net(t, Protocol::Tcp))
            .chain(parse_proc_net(UDP, Protocol::Udp))
            .collect();
        let blocked = |protocol, port| blocking(&all, protocol, port, public()).is_some();
        assert!(blocked(Protocol::Tcp, 6443), "wildcard");
        assert!(blocked(Protocol::Tcp, 9000), "the public address");
        assert!(blocked(Protocol::Tcp, 8080), "IPv6 wildcard");
        assert!(blocked(Protocol::Tcp, 8081), "IPv4-mapped public address");
        assert!(blocked(Protocol::Udp, 8472));
        assert!(!blocked(Protocol::Tcp, 3306), "loopback only");
        assert!(!blocked(Protocol::Tcp, 8082), "IPv6 loopback only");
        assert!(!blocked(Protocol::Udp, 6443), "another protocol");
        assert!(!blocked(Protocol::Tcp, 9001));
        assert!(
            blocking(&all, Protocol::Tcp, 9000, "198.51.100.1".parse().unwrap()).is_none(),
            "bound to another address of the node"
        );
    }

    #[test]
    fn garbage_lines_are_skipped() {
        let text = "header\n 0: nonsense\n 1: 00000000:ZZZZ 00000000:0000 0A\n";
        assert!(parse_proc_net(text, Protocol::Tcp).is_empty());
    }

    #[test]
    fn this_process_sees_its_own_listener() {
        let socket = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let port = socket.local_addr().unwrap().port();
        let listeners = read(&NetworkNamespace::Current).unwrap();
        assert!(
            blocking(&listeners, Protocol::Tcp, port, public()).is_some(),
            "{listeners:?}"
        );
    }
}
