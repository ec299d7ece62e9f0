//! The client a handshake query is answered for, as one value: its
//! number, its peer and its TLS state. The table asks it who may see what;
//! the chain gets it as the [`Connection`] its layers are called for.

use std::ffi::CString;
use std::sync::Arc;

use crate::layers::connection::{Connection, Peer};
use crate::session::{PeerIdentity, TlsState};

/// One connection, as serving needs to know it.
#[derive(Debug, Clone)]
pub struct Client {
    /// The connection's number, as the log gives it.
    pub id: u64,
    /// Who it is.
    pub peer: Peer,
    /// Whether it runs over TLS, and the identity it showed.
    pub tls: TlsState,
}

impl Client {
    /// The connection the chain is called for, before any export is
    /// opened for it: its name is empty until an open resolves one.
    pub fn connection(&self) -> Arc<Connection> {
        let certificate = match &self.tls.identity {
            Some(PeerIdentity::Certificate { subject, issuer }) => CString::new(subject.as_str())
                .ok()
                .zip(CString::new(issuer.as_str()).ok()),
            _ => None,
        };
        let identity = self
            .tls
            .identity
            .as_ref()
            .and_then(|i| CString::new(i.name()).ok());
        Arc::new(Connection::new(
            self.id,
            Some(self.peer),
            self.tls.active,
            identity,
            certificate,
        ))
    }
}
