//! The rbd plugin: serve a Ceph RBD image (or a snapshot of one) through
//! librbd, so that any number of nbdhost processes, on any number of
//! hosts, can serve one cluster's images.
//!
//! `nbdhost rbd image=vms/disk1` (or `nbdhost rbd vms/disk1`) connects as
//! `client.admin` with the default ceph.conf; `id=`, `keyring=`, `conf=`,
//! `cluster=` choose otherwise, `snap=` serves a snapshot read-only. See
//! `man/nbdhost-rbd-plugin.1`.
//!
//! librbd is found by build.rs; where it is missing the plugin is still
//! built, so that the workspace builds without Ceph, but refuses to start
//! (see `absent`).

#![deny(unsafe_code)]

// Without librbd only the parsing is used, not what serving needs of it.
#[cfg_attr(not(have_librbd), allow(dead_code))]
mod config;

#[cfg(have_librbd)]
mod ffi;
#[cfg(have_librbd)]
mod serve;
#[cfg(have_librbd)]
nbdhost_plugin_api::nbdhost_plugin!(serve::Rbd);

#[cfg(not(have_librbd))]
mod absent;
#[cfg(not(have_librbd))]
nbdhost_plugin_api::nbdhost_plugin!(absent::Rbd);
