//! Where connections come from: TCP, Unix and AF_VSOCK listeners (bound by
//! us or passed by systemd socket activation) and the stdin/stdout pair of
//! `-s`.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::path::{Path, PathBuf};

use mio::event::Source;
use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};

use bytes::BytesMut;

use crate::layers::connection::{Credentials, Peer};
use crate::private_dir::{PrivateDir, PrivateDirError};

/// Send buffer asked for on accepted Unix sockets.
const UNIX_SEND_BUFFER: usize = 1 << 20;

/// A listening socket.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
    /// mio has no vsock type; the socket is non-blocking and polled by
    /// its descriptor.
    Vsock(socket2::Socket),
}

/// The connecting process's credentials (`SO_PEERCRED`), which plugins
/// may ask for; `None` where `s` is not a Unix socket.
pub(super) fn peer_credentials(s: &impl AsRawFd) -> Option<Credentials> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a ucred
    // as SO_PEERCRED expects, on a socket we own.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (r == 0).then(|| Credentials {
        pid: i64::from(cred.pid),
        uid: i64::from(cred.uid),
        gid: i64::from(cred.gid),
    })
}

impl Listener {
    /// Accept one connection, or `WouldBlock`.
    pub fn accept(&self) -> io::Result<(Stream, Peer)> {
        match self {
            Listener::Tcp(l) => {
                let (s, addr) = l.accept()?;
                s.set_nodelay(true)?;
                Ok((Stream::Tcp(s), Peer::Inet(addr)))
            }
            Listener::Unix(l) => {
                let (s, _) = l.accept()?;
                // Room for a whole 1 MiB reply, so it goes out in one write
                // instead of several with a readiness round trip between
                // them. The kernel caps it at net.core.wmem_max. TCP keeps
                // its autotuning, which a fixed size would turn off.
                let _ = socket2::SockRef::from(&s).set_send_buffer_size(UNIX_SEND_BUFFER);
                let creds = peer_credentials(&s);
                Ok((Stream::Unix(s), Peer::Unix(creds)))
            }
            Listener::Vsock(l) => {
                let (s, addr) = l.accept()?;
                s.set_nonblocking(true)?;
                let (cid, port) = addr.as_vsock_address().unwrap_or((0, 0));
                Ok((Stream::Vsock(s), Peer::Vsock { cid, port }))
            }
        }
    }

    /// Turn on TCP keepalive for the connections this listener accepts
    /// (Linux copies SO_KEEPALIVE to each accepted socket); Unix sockets
    /// have none.
    pub fn set_keepalive(&self) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => socket2::SockRef::from(l).set_keepalive(true),
            Listener::Unix(_) | Listener::Vsock(_) => Ok(()),
        }
    }

    /// A human-readable address, for logs.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l.local_addr().map_or("tcp".into(), |a| a.to_string()),
            Listener::Unix(l) => l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
                .unwrap_or_else(|| "unix".into()),
            Listener::Vsock(l) => match l.local_addr().ok().and_then(|a| a.as_vsock_address()) {
                Some((_, port)) => format!("vsock port {port}"),
                None => "vsock".into(),
            },
        }
    }
}

impl Source for Listener {
    fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.register(r, t, i),
            Listener::Unix(l) => l.register(r, t, i),
            Listener::Vsock(l) => SourceFd(&l.as_raw_fd()).register(r, t, i),
        }
    }
    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.reregister(r, t, i),
            Listener::Unix(l) => l.reregister(r, t, i),
            Listener::Vsock(l) => SourceFd(&l.as_raw_fd()).reregister(r, t, i),
        }
    }
    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.deregister(r),
            Listener::Unix(l) => l.deregister(r),
            Listener::Vsock(l) => SourceFd(&l.as_raw_fd()).deregister(r),
        }
    }
}

fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // Keep IPv6 apart so the IPv4 wildcard can be bound beside it.
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(TcpListener::from_std(s.into()))
}

/// Which IP families to listen on (`-4`, `-6`, or both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Any,
    V4,
    V6,
}

impl Family {
    fn admits(self, a: &SocketAddr) -> bool {
        match self {
            Family::Any => true,
            Family::V4 => a.is_ipv4(),
            Family::V6 => a.is_ipv6(),
        }
    }
}

/// Why a listening socket could not be made.
#[derive(Debug)]
pub enum ListenError {
    /// A host name to listen on did not resolve.
    Resolve { host: String, source: io::Error },
    /// Binding or listening on an address failed.
    Bind { address: String, source: io::Error },
    /// No address of the family asked for is left to listen on.
    NoAddress { port: u16 },
    /// The private socket's directory could not be made.
    PrivateDirectory(PrivateDirError),
    /// A descriptor passed by socket activation is not a usable socket.
    Activated { fd: RawFd, source: io::Error },
}

impl std::fmt::Display for ListenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenError::Resolve { host, source } => write!(f, "cannot resolve {host}: {source}"),
            ListenError::Bind { address, source } => {
                write!(f, "cannot listen on {address}: {source}")
            }
            ListenError::NoAddress { port } => write!(f, "no address to listen on for port {port}"),
            ListenError::PrivateDirectory(e) => e.fmt(f),
            ListenError::Activated { fd, source } => {
                write!(f, "socket activation: fd {fd}: {source}")
            }
        }
    }
}

impl std::error::Error for ListenError {}

/// Bind TCP listeners on `port`: on `ipaddr` if given, otherwise on the
/// IPv4 and IPv6 wildcard addresses (IPv6 may be missing on the host);
/// only those of `family`.
pub fn tcp(ipaddr: Option<&str>, port: u16, family: Family) -> Result<Vec<Listener>, ListenError> {
    let addrs: Vec<SocketAddr> = match ipaddr {
        Some(a) => {
            let host = a.trim_start_matches('[').trim_end_matches(']');
            match host.parse::<IpAddr>() {
                Ok(ip) => vec![SocketAddr::new(ip, port)],
                Err(_) => (host, port)
                    .to_socket_addrs()
                    .map_err(|source| ListenError::Resolve {
                        host: a.to_string(),
                        source,
                    })?
                    .collect(),
            }
        }
        None => vec![
            SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port),
            SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port),
        ],
    };
    let addrs: Vec<SocketAddr> = addrs.into_iter().filter(|a| family.admits(a)).collect();
    let wildcard_v6_optional = ipaddr.is_none() && family == Family::Any;
    let mut out = Vec::new();
    let mut last_err = None;
    for a in addrs {
        match bind_tcp(a) {
            Ok(l) => out.push(Listener::Tcp(l)),
            Err(e)
                if wildcard_v6_optional && a.is_ipv6() && e.kind() != io::ErrorKind::AddrInUse =>
            {
                log::debug!("not listening on {a}: {e}");
            }
            Err(source) => {
                last_err = Some(ListenError::Bind {
                    address: a.to_string(),
                    source,
                })
            }
        }
    }
    match last_err {
        Some(e) => Err(e),
        None if out.is_empty() => Err(ListenError::NoAddress { port }),
        None => Ok(out),
    }
}

/// Bind a Unix socket at `path`, replacing a stale socket file.
pub fn unix(path: &Path) -> Result<Listener, ListenError> {
    if let Ok(md) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if md.file_type().is_socket() {
            let _ = std::fs::remove_file(path);
        }
    }
    UnixListener::bind(path)
        .map(Listener::Unix)
        .map_err(|source| ListenError::Bind {
            address: path.display().to_string(),
            source,
        })
}

/// Listen on AF_VSOCK `port` for any context id (`--vsock`), so that
/// guests reach the host at CID 2 and the host itself at CID 1 where the
/// kernel has vsock loopback.
pub fn vsock(port: u32) -> Result<Listener, ListenError> {
    let bind = || -> io::Result<socket2::Socket> {
        let s = socket2::Socket::new(socket2::Domain::VSOCK, socket2::Type::STREAM, None)?;
        s.set_nonblocking(true)?;
        s.bind(&socket2::SockAddr::vsock(libc::VMADDR_CID_ANY, port))?;
        s.listen(1024)?;
        Ok(s)
    };
    bind()
        .map(Listener::Vsock)
        .map_err(|source| ListenError::Bind {
            address: format!("vsock port {port}"),
            source,
        })
}

/// A private directory holding a socket, for `-U -` and `--run`; both go
/// when it is dropped.
pub struct PrivateSocket {
    pub dir: PrivateDir,
    pub path: PathBuf,
}

impl PrivateSocket {
    /// A socket path in a fresh directory only we can enter.
    pub fn new() -> Result<PrivateSocket, ListenError> {
        let dir = PrivateDir::new("").map_err(ListenError::PrivateDirectory)?;
        let path = dir.path().join("socket");
        Ok(PrivateSocket { dir, path })
    }
}

/// Listeners passed by systemd socket activation (`LISTEN_PID` and
/// `LISTEN_FDS`), or `None` if we were not socket-activated.
pub fn socket_activation() -> Option<Result<Vec<Listener>, ListenError>> {
    let pid: u32 = std::env::var("LISTEN_PID").ok()?.parse().ok()?;
    if pid != std::process::id() {
        return None;
    }
    let n: i32 = std::env::var("LISTEN_FDS").ok()?.parse().ok()?;
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_FDNAMES");
    let mut out = Vec::new();
    for fd in 3..3 + n {
        // SAFETY: systemd passes these descriptors to us for our exclusive
        // use, numbered from 3 (sd_listen_fds(3)).
        let sock = unsafe { socket2::Socket::from_raw_fd(fd) };
        let addr = match sock.local_addr() {
            Ok(a) => a,
            Err(source) => return Some(Err(ListenError::Activated { fd, source })),
        };
        if let Err(source) = sock.set_nonblocking(true) {
            return Some(Err(ListenError::Activated { fd, source }));
        }
        if addr.is_unix() {
            out.push(Listener::Unix(UnixListener::from_std(sock.into())));
        } else if addr.as_vsock_address().is_some() {
            out.push(Listener::Vsock(sock));
        } else {
            out.push(Listener::Tcp(TcpListener::from_std(sock.into())));
        }
    }
    Some(Ok(out))
}

/// One connected client.
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    Vsock(socket2::Socket),
    /// `-s`: read from stdin, write to stdout (often one socket, but
    /// either may be a file epoll cannot watch: see [`Stream::register`]).
    Stdio {
        input: RawFd,
        output: RawFd,
        /// Registered with the poller.
        watched: [bool; 2],
    },
}

/// The outcome of registering one of stdio's descriptors: epoll refuses
/// regular files and `/dev/null` with EPERM, as they are always ready;
/// those are used without waiting.
fn watch(r: io::Result<()>) -> io::Result<bool> {
    match r {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Ok(false),
        Err(e) => Err(e),
    }
}

impl Stream {
    /// The stdin/stdout pair, switched to non-blocking mode.
    pub fn stdio() -> io::Result<Stream> {
        for fd in [0, 1] {
            set_nonblocking(fd)?;
        }
        Ok(Stream::Stdio {
            input: 0,
            output: 1,
            watched: [false; 2],
        })
    }

    /// Whether input never raises a readiness event (stdin is a file the
    /// poller cannot watch), so must be read until it would block or ends.
    pub fn unwatched_input(&self) -> bool {
        matches!(self, Stream::Stdio { watched, .. } if !watched[0])
    }

    fn fd_read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is writable for its length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    fn fd_writev(fd: RawFd, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        // SAFETY: IoSlice is ABI-compatible with struct iovec, and the
        // slices are readable for their lengths.
        let n = unsafe { libc::writev(fd, bufs.as_ptr().cast(), bufs.len().min(1024) as i32) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Read into the spare capacity of `buf`, appending what arrives, so
    /// nothing is zero-filled or copied on the way.
    pub fn read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        let fd = self.as_raw_fd();
        let spare = buf.spare_capacity_mut();
        // SAFETY: read(2) writes at most `spare.len()` bytes into memory that
        // is valid for writes, and only the count it returns is kept.
        let n = unsafe { libc::read(fd, spare.as_mut_ptr().cast(), spare.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel initialised the first `n` spare bytes.
        unsafe { buf.set_len(buf.len() + n as usize) };
        Ok(n as usize)
    }

    /// Shut down both directions; errors are irrelevant at this point.
    pub fn shutdown(&self) {
        match self {
            Stream::Tcp(s) => drop(s.shutdown(std::net::Shutdown::Both)),
            Stream::Unix(s) => drop(s.shutdown(std::net::Shutdown::Both)),
            Stream::Vsock(s) => drop(s.shutdown(std::net::Shutdown::Both)),
            Stream::Stdio { .. } => {}
        }
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own, with integer arguments.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether two descriptors refer to the same open file (a socketpair on
/// stdin and stdout), which must be registered with the poller only once.
fn same_file(a: RawFd, b: RawFd) -> bool {
    let stat = |fd: RawFd| {
        // SAFETY: `st` is plain data and fstat fills it.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor and a writable stat buffer.
        (unsafe { libc::fstat(fd, &mut st) } == 0).then_some((st.st_dev, st.st_ino))
    };
    stat(a).is_some() && stat(a) == stat(b)
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
            Stream::Vsock(s) => Stream::fd_read(s.as_raw_fd(), buf),
            Stream::Stdio { input, .. } => Stream::fd_read(*input, buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[io::IoSlice::new(buf)])
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
            Stream::Vsock(s) => Stream::fd_writev(s.as_raw_fd(), bufs),
            Stream::Stdio { output, .. } => Stream::fd_writev(*output, bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Source for Stream {
    fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.register(r, t, i),
            Stream::Unix(s) => s.register(r, t, i),
            Stream::Vsock(s) => SourceFd(&s.as_raw_fd()).register(r, t, i),
            Stream::Stdio {
                input,
                output,
                watched,
            } => {
                if same_file(*input, *output) {
                    let w = watch(SourceFd(input).register(r, t, i))?;
                    *watched = [w, w];
                } else {
                    watched[0] = watch(SourceFd(input).register(r, t, Interest::READABLE))?;
                    watched[1] = watch(SourceFd(output).register(r, t, Interest::WRITABLE))?;
                }
                Ok(())
            }
        }
    }
    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.reregister(r, t, i),
            Stream::Unix(s) => s.reregister(r, t, i),
            Stream::Vsock(s) => SourceFd(&s.as_raw_fd()).reregister(r, t, i),
            Stream::Stdio { input, .. } => SourceFd(input).reregister(r, t, i),
        }
    }
    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.deregister(r),
            Stream::Unix(s) => s.deregister(r),
            Stream::Vsock(s) => SourceFd(&s.as_raw_fd()).deregister(r),
            Stream::Stdio {
                input,
                output,
                watched,
            } => {
                if watched[0] {
                    SourceFd(input).deregister(r)?;
                }
                if watched[1] && !same_file(*input, *output) {
                    SourceFd(output).deregister(r)?;
                }
                *watched = [false; 2];
                Ok(())
            }
        }
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Vsock(s) => s.as_raw_fd(),
            Stream::Stdio { input, .. } => *input,
        }
    }
}
