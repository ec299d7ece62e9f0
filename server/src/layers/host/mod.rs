//! Host services: the function-pointer table handed to every plugin and
//! filter, and the services its functions answer from.
//!
//! [`table`] is the C edge: it only converts between C and the Rust
//! service that does the work, and holds the host's `unsafe` code with
//! [`context`] (a raw pointer to the borrowed connection, for functions
//! that take no argument) and [`secret`] (taking over a descriptor the
//! user named). Each of the other modules is one service, in safe Rust:
//!
//! - [`context`]: which connection the callback running on this thread
//!   is made for (the server passes it explicitly, as a
//!   `layers::connection::Connection`), set around each callback by a
//!   guard;
//! - [`call`]: which layer is being called, and the error it recorded;
//! - [`debug_flags`]: the `-D layer.flag=N` settings;
//! - [`stdio`]: whether layers may use stdin and stdout;
//! - [`shutdown`]: a layer asking the server to stop, and the server's
//!   shutdown cutting layers' sleeps short;
//! - [`timer`]: deadlines that hold no thread (`next->after`), fired
//!   early by shutdown;
//! - [`names`]: layer names kept for the life of the process;
//! - [`size`] and [`secret`]: the parameter forms the host parses for
//!   layers.

pub mod call;
pub mod context;
pub mod debug_flags;
pub mod names;
mod restore;
pub mod secret;
pub mod shutdown;
pub mod size;
pub mod stdio;
pub mod table;
pub mod timer;
