//! What a session asks of its driver, and what the driver hands back.
//!
//! A session never calls the layer chain: it emits [`Work`] (a handshake
//! query, a request, the disposal of the handle) and takes [`Done`] when
//! that work is finished, wherever the driver chose to run it.

use bytes::{Bytes, BytesMut};

use super::buffers::PooledBuf;
use crate::protocol::export::Extent;
use crate::protocol::handshake::{Answer, Query};
use crate::protocol::request::{Command, Op};

/// Work for the driver. `H` is the driver's opened export (the handle the
/// session keeps for the connection and disposes of at the end).
#[derive(Debug)]
pub enum Work<H> {
    /// Run a handshake query; answer with [`Done::Query`].
    Query { query: Query, tls: TlsState },
    /// Run a request on the open handle; answer with [`Done::Request`].
    Request(Request),
    /// Close the handle, under the thread model and in the connection's
    /// context; answer with [`Done::Closed`]. Emitted once, when nothing of
    /// the connection is running any more.
    Close(H),
}

/// What the client has proved over TLS, for queries that depend on it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsState {
    /// The connection is inside TLS.
    pub active: bool,
    /// Who the client proved to be, if anyone.
    pub identity: Option<PeerIdentity>,
}

/// Who a client proved to be in its TLS handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerIdentity {
    /// A PSK user name.
    Psk(String),
    /// A client certificate the server verified: its subject's and its
    /// issuer's distinguished names.
    Certificate { subject: String, issuer: String },
}

impl PeerIdentity {
    /// The PSK user name or the certificate's subject DN.
    pub fn name(&self) -> &str {
        match self {
            PeerIdentity::Psk(user) => user,
            PeerIdentity::Certificate { subject, .. } => subject,
        }
    }
}

impl std::fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One transmission request handed out by the session.
#[derive(Debug)]
pub struct Request {
    op: Op,
    /// Bytes charged to the connection's budget while it runs.
    cost: usize,
}

impl Request {
    pub(super) fn new(op: Op, cost: usize) -> Request {
        Request { op, cost }
    }

    /// The request.
    pub fn op(&self) -> &Op {
        &self.op
    }

    /// For a read, how large a buffer its data needs.
    pub fn read_len(&self) -> Option<usize> {
        match self.op.command {
            Command::Read { len, .. } => Some(len as usize),
            _ => None,
        }
    }

    pub(super) fn cost(&self) -> usize {
        self.cost
    }
}

/// The result of a [`Request`].
#[derive(Debug)]
pub enum Outcome {
    /// Success without data.
    Done,
    /// A read's data, exactly as long as the read.
    Data(PooledBuf),
    /// Block status: extents covering at least the request's first byte.
    Extents(Vec<Extent>),
    /// Failure, as an NBD error number.
    Failed(u32),
}

/// Finished work, for [`super::Session::complete`].
#[derive(Debug)]
pub enum Done<H> {
    /// A query's answer; `opened` is the handle if the query opened the
    /// export for transmission.
    Query { answer: Answer, opened: Option<H> },
    /// A request with its outcome.
    Request(Request, Outcome),
    /// The handle has been closed.
    Closed,
}

/// How far a TLS handshake has got: what [`TlsEngine::handshake`] says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsHandshake {
    /// Complete, and the peer verified if that is required.
    Done,
    /// Not yet: send what the engine has to send, and call again when more
    /// ciphertext has arrived.
    InProgress,
}

/// Whether the client's side of a TLS session is still open: what
/// [`TlsEngine::read`] says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsRead {
    /// Open: call again when more ciphertext has arrived.
    Open,
    /// The client closed the TLS session (a close_notify, or the end of
    /// the transport inside a record): nothing more will come.
    Closed,
}

/// Why a TLS engine failed or could not start. The session only logs it
/// (nothing decides on it), so it is whatever error the engine has:
/// `tls::TlsError` for GnuTLS. Boxed, so the session knows nothing of the
/// engine behind it; it is made only on failure.
pub type TlsEngineError = Box<dyn std::error::Error + Send + Sync>;

/// A server-side TLS engine over in-memory buffers: the session feeds it
/// ciphertext and takes ciphertext back, and it never touches a socket.
///
/// Its errors are messages for the log: nothing decides on them.
pub trait TlsEngine {
    /// Where ciphertext received from the client goes.
    fn incoming(&mut self) -> &mut BytesMut;
    /// Advance the handshake with what has arrived.
    #[must_use = "the handshake may have completed or failed"]
    fn handshake(&mut self) -> Result<TlsHandshake, TlsEngineError>;
    /// Decrypt what has arrived, appending plaintext to `out`.
    #[must_use = "the client may have closed the TLS session"]
    fn read(&mut self, out: &mut BytesMut) -> Result<TlsRead, TlsEngineError>;
    /// Encrypt `data`. Output may be held back until [`TlsEngine::flush`]
    /// so that many small writes share full records.
    fn write(&mut self, data: &[u8]) -> Result<(), TlsEngineError>;
    /// Seal everything written into records.
    fn flush(&mut self) -> Result<(), TlsEngineError>;
    /// Ciphertext to send, if any.
    #[must_use = "the ciphertext taken must be sent"]
    fn take_output(&mut self) -> Option<Bytes>;
    /// Queue a close_notify alert.
    fn close_notify(&mut self);
    /// The negotiated protocol version and cipher, for the log.
    fn protocol(&self) -> String;
    /// Once the handshake is complete: who the client proved to be.
    fn peer_identity(&self) -> Option<PeerIdentity>;
    /// The PSK user the client offered, known even if the handshake failed.
    fn attempted_user(&self) -> Option<String>;
}

/// Makes a [`TlsEngine`] for each connection that starts TLS.
pub trait TlsFactory: Send + Sync {
    /// A new server-side engine.
    fn start(&self) -> Result<Box<dyn TlsEngine>, TlsEngineError>;
}
