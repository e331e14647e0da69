//! Network-namespace topologies for tests and benchmarks that need real packets.
//!
//! Every namespace is named `uit-<role>-<pid>-<n>` so parallel tests never collide, and is
//! deleted by [`Netns`]'s `Drop`, which also runs while a failing test unwinds. Code runs inside
//! a namespace in two ways: commands through `ip netns exec` ([`Netns::command`]) and Rust
//! closures on a fresh thread that has `setns(2)`-ed into it ([`Netns::enter`]). Sockets keep
//! the namespace they were created in, so a listener or client socket made inside `enter` can be
//! used from any thread afterwards.
//!
//! Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN).

use std::io::{self, BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, bail};

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A named network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    /// Whether dropping this deletes the namespace (false for one made by someone else).
    owned: bool,
}

impl Netns {
    /// Creates `uit-<role>-<pid>-<n>` with its loopback up.
    pub fn create(role: &str) -> Result<Netns> {
        let name = format!(
            "uit-{role}-{}-{}",
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::Relaxed)
        );
        run_checked(Command::new("ip").args(["netns", "add", &name]))
            .with_context(|| format!("creating network namespace {name}"))?;
        let netns = Netns { name, owned: true };
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// A namespace made by someone else (e.g. `hack/cluster.sh`); dropping it leaves it be.
    pub fn existing(name: &str) -> Result<Netns> {
        let netns = Netns {
            name: name.to_string(),
            owned: false,
        };
        if !netns.path().exists() {
            bail!("network namespace {name} does not exist");
        }
        Ok(netns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind mount `ip netns` keeps the namespace alive with.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip netns exec <name> <program>`; add arguments and run it yourself.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    /// Runs `program args...` inside the namespace; fails unless it exits 0. Returns stdout.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        let output = run_checked(self.command(program).args(args))
            .with_context(|| format!("in netns {}: {program} {}", self.name, args.join(" ")))?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `ip -n <name> args...`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        run_checked(Command::new("ip").args(["-n", &self.name]).args(args))
            .with_context(|| format!("ip -n {} {}", self.name, args.join(" ")))?;
        Ok(())
    }

    /// Writes a sysctl of this namespace, e.g. `("net.ipv4.ip_forward", "1")`.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.run("sysctl", &["-q", "-w", &format!("{key}={value}")])?;
        Ok(())
    }

    /// Adds `address` (CIDR) to `interface` and brings the interface up.
    pub fn add_address(&self, interface: &str, address: &str) -> Result<()> {
        self.ip(&["address", "add", address, "dev", interface])?;
        self.ip(&["link", "set", interface, "up"])
    }

    /// `ip route add <route...>`, e.g. `&["default", "via", "10.244.1.1"]`.
    pub fn add_route(&self, route: &[&str]) -> Result<()> {
        let mut args = vec!["route", "add"];
        args.extend_from_slice(route);
        self.ip(&args)
    }

    /// Runs `work` on a new thread that has joined this namespace, and returns its result.
    /// The calling thread's namespace is untouched.
    pub fn enter<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let path = self.path();
        std::thread::spawn(move || -> Result<T> {
            join_netns(&path)?;
            Ok(work())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread inside netns panicked"))?
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        // Best effort: a failing delete must not turn a test failure into a double panic.
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .output();
    }
}

fn join_netns(path: &std::path::Path) -> Result<()> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: setns only reads the descriptor, which `file` keeps open for the call.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("setns into {}", path.display()));
    }
    Ok(())
}

fn run_checked(command: &mut Command) -> Result<Output> {
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
    Ok(output)
}

/// Creates a veth pair with `a_interface` in `a` and `b_interface` in `b`.
pub fn veth(a: &Netns, a_interface: &str, b: &Netns, b_interface: &str) -> Result<()> {
    a.ip(&[
        "link",
        "add",
        a_interface,
        "type",
        "veth",
        "peer",
        "name",
        b_interface,
        "netns",
        b.name(),
    ])
}

/// The bridge in a [`public_client`] namespace that every simulated server's public link joins.
pub const PUBLIC_BRIDGE: &str = "br0";

/// A client namespace standing for the outside world: a bridge [`PUBLIC_BRIDGE`] holding
/// [`CLIENT_ADDRESS`]/24, to which [`attach_public_node`] plugs simulated servers.
pub fn public_client() -> Result<Netns> {
    let client = Netns::create("client")?;
    client.ip(&["link", "add", PUBLIC_BRIDGE, "type", "bridge"])?;
    client.add_address(PUBLIC_BRIDGE, &format!("{CLIENT_ADDRESS}/24"))?;
    Ok(client)
}

/// Plugs a simulated server into the client's public bridge: a veth with `public0` in `node`
/// (holding `public`/24, default route via the client) and `peer` on the bridge.
pub fn attach_public_node(
    client: &Netns,
    node: &Netns,
    peer: &str,
    public: Ipv4Addr,
) -> Result<()> {
    veth(node, "public0", client, peer)?;
    client.ip(&["link", "set", peer, "master", PUBLIC_BRIDGE, "up"])?;
    node.add_address("public0", &format!("{public}/24"))?;
    node.add_route(&["default", "via", &CLIENT_ADDRESS.to_string()])
}

/// The node's public address in [`ForwardingTopology`].
pub const NODE_PUBLIC_ADDRESS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// The outside client's address.
pub const CLIENT_ADDRESS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 100);
/// The node's address on the container network (the container's gateway).
pub const NODE_CONTAINER_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
/// The container's private address.
pub const CONTAINER_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
/// The container network, as a node's pod CIDR.
pub const CONTAINER_NETWORK: &str = "10.244.1.0/24";

/// `client (203.0.113.100) ── (203.0.113.10) node (10.244.1.1) ── (10.244.1.2) container`
///
/// The node forwards IPv4; the container's default route and the client's route to the
/// container network both go through the node, as on a real server. Drop order deletes all
/// three namespaces (and with them the veths).
pub struct ForwardingTopology {
    pub client: Netns,
    pub node: Netns,
    pub container: Netns,
}

impl ForwardingTopology {
    pub fn create() -> Result<ForwardingTopology> {
        let topology = ForwardingTopology {
            client: Netns::create("client")?,
            node: Netns::create("node")?,
            container: Netns::create("ctr")?,
        };
        let ForwardingTopology {
            client,
            node,
            container,
        } = &topology;
        veth(node, "public0", client, "eth0")?;
        veth(node, "ctr0", container, "eth0")?;
        node.add_address("public0", &format!("{NODE_PUBLIC_ADDRESS}/24"))?;
        node.add_address("ctr0", &format!("{NODE_CONTAINER_GATEWAY}/24"))?;
        client.add_address("eth0", &format!("{CLIENT_ADDRESS}/24"))?;
        container.add_address("eth0", &format!("{CONTAINER_ADDRESS}/24"))?;
        container.add_route(&["default", "via", &NODE_CONTAINER_GATEWAY.to_string()])?;
        node.sysctl("net.ipv4.ip_forward", "1")?;
        Ok(topology)
    }
}

/// A server thread serving until dropped.
pub struct EchoServer {
    pub address: SocketAddrV4,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// How often idle server loops look at their stop flag.
const SERVER_POLL: Duration = Duration::from_millis(20);

/// Every reply names the peer the server saw, so tests can tell whether a connection was
/// masqueraded: `"<line> from <peer ip>"`.
fn reply_for(message: &str, peer: SocketAddr) -> String {
    format!("{} from {}", message.trim_end(), peer.ip())
}

/// A line-echo TCP server inside `netns`, bound before this returns.
pub fn tcp_echo_server(netns: &Netns, address: SocketAddrV4) -> Result<EchoServer> {
    let listener = netns.enter(move || TcpListener::bind(address))??;
    listener.set_nonblocking(true)?;
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = stop.clone();
    let thread = std::thread::spawn(move || {
        while !stopping.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((stream, peer)) => {
                    let stopping = stopping.clone();
                    std::thread::spawn(move || serve_tcp_echo(stream, peer, &stopping));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(SERVER_POLL),
                Err(_) => std::thread::sleep(SERVER_POLL),
            }
        }
    });
    Ok(EchoServer {
        address,
        stop,
        thread: Some(thread),
    })
}

fn serve_tcp_echo(stream: TcpStream, peer: SocketAddr, stop: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(SERVER_POLL * 5));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                if writer
                    .write_all(format!("{}\n", reply_for(&line, peer)).as_bytes())
                    .is_err()
                {
                    return;
                }
                line.clear();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// A datagram echo server inside `netns`, bound before this returns.
pub fn udp_echo_server(netns: &Netns, address: SocketAddrV4) -> Result<EchoServer> {
    let socket = netns.enter(move || UdpSocket::bind(address))??;
    socket.set_read_timeout(Some(SERVER_POLL))?;
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = stop.clone();
    let thread = std::thread::spawn(move || {
        let mut buffer = [0u8; 2048];
        while !stopping.load(Ordering::Relaxed) {
            if let Ok((length, peer)) = socket.recv_from(&mut buffer) {
                let message = String::from_utf8_lossy(&buffer[..length]).into_owned();
                let _ = socket.send_to(reply_for(&message, peer).as_bytes(), peer);
            }
        }
    });
    Ok(EchoServer {
        address,
        stop,
        thread: Some(thread),
    })
}

/// A TCP connection opened from inside a namespace.
pub struct TcpSession {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl TcpSession {
    /// Connects from `netns` to `address`, failing after `timeout`.
    pub fn connect(
        netns: &Netns,
        address: SocketAddrV4,
        timeout: Duration,
    ) -> io::Result<TcpSession> {
        let stream = netns
            .enter(move || TcpStream::connect_timeout(&address.into(), timeout))
            .map_err(io::Error::other)??;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(TcpSession {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
        })
    }

    /// Sends one line and returns the reply line (without the newline).
    pub fn exchange(&mut self, message: &str) -> io::Result<String> {
        self.writer.write_all(format!("{message}\n").as_bytes())?;
        let mut reply = String::new();
        if self.reader.read_line(&mut reply)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        Ok(reply.trim_end().to_owned())
    }
}

/// One request/reply over a fresh TCP connection from `netns`.
pub fn tcp_exchange(
    netns: &Netns,
    address: SocketAddrV4,
    message: &str,
    timeout: Duration,
) -> io::Result<String> {
    TcpSession::connect(netns, address, timeout)?.exchange(message)
}

/// A connected UDP socket created inside a namespace: its source port stays the same, so
/// consecutive exchanges belong to one conntrack flow.
pub struct UdpFlow {
    socket: UdpSocket,
}

impl UdpFlow {
    pub fn open(netns: &Netns, peer: SocketAddrV4, timeout: Duration) -> io::Result<UdpFlow> {
        let socket = netns
            .enter(move || -> io::Result<UdpSocket> {
                let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
                socket.connect(peer)?;
                Ok(socket)
            })
            .map_err(io::Error::other)??;
        socket.set_read_timeout(Some(timeout))?;
        Ok(UdpFlow { socket })
    }

    /// Sends one datagram and waits (up to the timeout) for one reply. An ICMP port
    /// unreachable surfaces as `ConnectionRefused`, no reply as `WouldBlock`/`TimedOut`.
    pub fn exchange(&self, message: &str) -> io::Result<String> {
        self.socket.send(message.as_bytes())?;
        let mut buffer = [0u8; 2048];
        let length = self.socket.recv(&mut buffer)?;
        Ok(String::from_utf8_lossy(&buffer[..length]).into_owned())
    }

    pub fn local_address(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }
}
