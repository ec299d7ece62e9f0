//! The NBD protocol as pure code over byte buffers: the wire format, the
//! handshake state machine, request decoding and reply encoding, and the
//! facts of an export they exchange. Nothing here touches a socket, a
//! thread or the layer chain.

pub mod export;
pub mod handshake;
pub mod reply;
pub mod request;
pub mod wire;
