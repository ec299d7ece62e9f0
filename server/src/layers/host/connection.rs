//! What a layer may learn about the connection a call is made for: its
//! number, export name, peer and TLS identity; and what the layer asked
//! to happen to it (`host->disconnect`).

use std::ffi::CString;
use std::sync::atomic::AtomicU8;

/// The peer of a connection, as plugins may ask for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// A TCP client.
    Inet(std::net::SocketAddr),
    /// A Unix-socket client, with its credentials where the kernel gave
    /// them.
    Unix(Option<Credentials>),
    /// An AF_VSOCK client: its context id and port.
    Vsock {
        /// The client's context id.
        cid: u32,
        /// The client's port.
        port: u32,
    },
    /// The client on stdin and stdout (`-s`).
    Pipe,
}

/// A Unix-socket peer's process, user and group, as `SO_PEERCRED` reports
/// them at connection time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credentials {
    /// The peer's process id.
    pub pid: i64,
    /// The peer's user id.
    pub uid: i64,
    /// The peer's group id.
    pub gid: i64,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Inet(a) => write!(f, "{a}"),
            Peer::Unix(Some(c)) => write!(f, "a Unix-socket client (pid {})", c.pid),
            Peer::Unix(None) => f.write_str("a Unix-socket client"),
            Peer::Vsock { cid, port } => write!(f, "vsock {cid}:{port}"),
            Peer::Pipe => f.write_str("the stdin client"),
        }
    }
}

/// What a plugin may ask about the connection a call is made for.
#[derive(Debug, Default)]
pub struct ConnContext {
    /// The connection's number, as the log gives it (from 1).
    pub id: u64,
    /// The export the client asked for (C, because layers get a pointer
    /// into it).
    pub export_name: CString,
    /// Who the client is, where known.
    pub peer: Option<Peer>,
    /// Whether the connection runs over TLS.
    pub is_tls: bool,
    /// PSK user name or certificate subject DN, on a TLS connection.
    pub identity: Option<CString>,
    /// A verified client certificate's subject and issuer DNs.
    pub certificate: Option<(CString, CString)>,
    /// What a layer asked with `host->disconnect`: [`DISCONNECT_GRACEFUL`]
    /// or [`DISCONNECT_FORCE`], 0 for nothing.
    pub disconnect: AtomicU8,
}

/// A layer asked to close its connection after the running requests.
pub const DISCONNECT_GRACEFUL: u8 = 1;
/// A layer asked to close its connection at once.
pub const DISCONNECT_FORCE: u8 = 2;

impl ConnContext {
    /// The same connection under another export name, as a filter opens
    /// the layer below. A disconnect asked for is not carried over: it
    /// stays with the context the server watches.
    pub(super) fn renamed(&self, name: &str) -> ConnContext {
        ConnContext {
            id: self.id,
            export_name: CString::new(name).unwrap_or_default(),
            peer: self.peer,
            is_tls: self.is_tls,
            identity: self.identity.clone(),
            certificate: self.certificate.clone(),
            disconnect: AtomicU8::new(0),
        }
    }
}
