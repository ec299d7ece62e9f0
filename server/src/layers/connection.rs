//! The connection a call into the chain is made for: its number, export
//! name, peer and TLS identity, and what a layer asked to happen to it
//! (`host->disconnect`).
//!
//! Passed explicitly, as an owned shared value ([`Arc<Connection>`]),
//! through the chain's `preconnect`, `list_exports`, `default_export` and
//! `open`, as nbdkit's backend passes its context; an opened handle keeps
//! the one it was opened with, so every request on it is made for it too,
//! and work a handle completes later, on another thread, still has it.
//! Only the C edge (`host::context`) puts it in a thread-local, for the
//! host functions that take no argument.

use std::ffi::CString;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

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
    /// The client on stdin and stdout (`-s`), with its credentials where
    /// stdin is a Unix socket (the socket pair libnbd's
    /// `nbd_connect_command` makes), as nbdkit finds them there.
    Pipe(Option<Credentials>),
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
            Peer::Pipe(_) => f.write_str("the stdin client"),
        }
    }
}

/// The connection a call is made for: what a layer may ask about it.
#[derive(Debug, Default)]
pub struct Connection {
    /// The connection's number, as the log gives it (from 1; 0 for the
    /// look a filter takes at the layer below when it starts).
    pub id: u64,
    /// The export it is opened under (C, because layers get a pointer
    /// into it): the name the client asked for, resolved, or the one a
    /// filter opened the layer below under; empty before an open.
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
    /// or [`DISCONNECT_FORCE`], 0 for nothing. Shared by every name the
    /// connection is opened under, so that a layer below a renaming
    /// filter asks for the connection the server watches.
    disconnect: Arc<AtomicU8>,
}

/// A layer asked to close its connection after the running requests.
pub const DISCONNECT_GRACEFUL: u8 = 1;
/// A layer asked to close its connection at once.
pub const DISCONNECT_FORCE: u8 = 2;

impl Connection {
    /// A client's connection, before any export is opened for it.
    pub fn new(
        id: u64,
        peer: Option<Peer>,
        is_tls: bool,
        identity: Option<CString>,
        certificate: Option<(CString, CString)>,
    ) -> Connection {
        Connection {
            id,
            peer,
            is_tls,
            identity,
            certificate,
            ..Connection::default()
        }
    }

    /// The same connection opened under the export `name`, as a filter
    /// opens the layer below or the server opens a resolved name: `self`
    /// again when the name is the one it has.
    pub fn renamed(self: &Arc<Connection>, name: CString) -> Arc<Connection> {
        if name == self.export_name {
            return self.clone();
        }
        Arc::new(Connection {
            id: self.id,
            export_name: name,
            peer: self.peer,
            is_tls: self.is_tls,
            identity: self.identity.clone(),
            certificate: self.certificate.clone(),
            disconnect: self.disconnect.clone(),
        })
    }

    /// A layer asks to close the connection: `how` is
    /// [`DISCONNECT_GRACEFUL`] or [`DISCONNECT_FORCE`]; the stronger of
    /// two asks wins.
    pub fn ask_disconnect(&self, how: u8) {
        self.disconnect.fetch_max(how, Ordering::Relaxed);
    }

    /// What a layer asked with `host->disconnect` since the last look:
    /// `Some(true)` to close at once, `Some(false)` once the running
    /// requests are answered.
    pub fn take_disconnect(&self) -> Option<bool> {
        match self.disconnect.swap(0, Ordering::Relaxed) {
            0 => None,
            how => Some(how == DISCONNECT_FORCE),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(name: &str) -> CString {
        CString::new(name).unwrap()
    }

    /// A filter opens the layer below for the same connection under the
    /// name it chose: a copy with that name, or the connection itself when
    /// the name is unchanged.
    #[test]
    fn a_renamed_connection_is_the_same_client_under_another_export() {
        let client = Arc::new(Connection::new(
            7,
            Some(Peer::Pipe(None)),
            true,
            Some(named("alice")),
            None,
        ));
        let a = client.renamed(named("a"));
        let b = a.renamed(named("b"));
        assert_eq!(a.export_name.to_bytes(), b"a");
        assert_eq!(b.export_name.to_bytes(), b"b");
        assert_eq!((b.id, b.peer, b.is_tls), (7, Some(Peer::Pipe(None)), true));
        assert_eq!(b.identity.as_deref(), Some(&*named("alice")));
        assert!(Arc::ptr_eq(&a.renamed(named("a")), &a));
    }

    /// A layer below a renaming filter asks for the connection the server
    /// watches: one ask, seen once, the stronger of two winning.
    #[test]
    fn a_disconnect_asked_under_any_name_is_the_connection_s() {
        let top = Arc::new(Connection::default()).renamed(named("top"));
        let below = top.renamed(named("below"));
        assert_eq!(top.take_disconnect(), None);
        below.ask_disconnect(DISCONNECT_GRACEFUL);
        top.ask_disconnect(DISCONNECT_FORCE);
        below.ask_disconnect(DISCONNECT_GRACEFUL);
        assert_eq!(top.take_disconnect(), Some(true));
        assert_eq!(below.take_disconnect(), None);
        below.ask_disconnect(DISCONNECT_GRACEFUL);
        assert_eq!(top.take_disconnect(), Some(false));
    }
}
