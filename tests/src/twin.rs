//! One command line served by nbdkit and by nbdhost, to compare what a
//! client sees from each: nbdhost's filters are drop-ins for nbdkit's,
//! and nbdkit's own man pages are their specification.

use crate::{missing, Server};
use std::path::Path;

/// Serve `args` (an nbdkit command line after `nbdkit -f -U SOCKET`, with
/// nbdkit's filter and plugin names) with nbdkit, then with nbdhost, run
/// `client` on each server's URI, and assert that both see the same.
/// Returns what they saw, or `None` (having said why) when nbdkit is not
/// installed.
pub fn same_as_nbdkit(args: &[&str], client: impl Fn(&str) -> String) -> Option<String> {
    if missing("(comparison with nbdkit)", &["nbdkit"]) {
        return None;
    }
    let reference = {
        let s = Server::start_program(Path::new("nbdkit"), args);
        client(&s.uri())
    };
    let ours = {
        let s = Server::start(args);
        client(&s.uri())
    };
    assert_eq!(
        ours,
        reference,
        "nbdhost and nbdkit differ for `{}`",
        args.join(" ")
    );
    Some(ours)
}
