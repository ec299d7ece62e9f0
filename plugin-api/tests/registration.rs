//! The SDK registers only the callbacks an `impl` block defines: the rest
//! stay NULL, so the server applies its own defaults and the call never
//! crosses the ABI.

use nbdhost_plugin_api::{
    abi, callbacks, nbdhost_filter, nbdhost_plugin, Filter, FilterHandle, Flags, Handle,
    NextOpener, Plugin, Result,
};

#[derive(Default)]
struct Disk;
struct DiskHandle;

#[callbacks]
impl Plugin for Disk {
    const NAME: &'static str = "disk";
    const DESCRIPTION: &'static str = "a plugin defining a few callbacks";
    type Handle = DiskHandle;

    fn config(&mut self, _key: &str, _value: &str) -> Result<()> {
        Ok(())
    }
    fn open(&self, _readonly: bool) -> Result<DiskHandle> {
        Ok(DiskHandle)
    }
}

#[callbacks]
impl Handle for DiskHandle {
    fn get_size(&self) -> Result<u64> {
        Ok(1 << 20)
    }
    fn pread(&self, buf: &mut [u8], _offset: u64, _flags: Flags) -> Result<()> {
        buf.fill(0);
        Ok(())
    }
    fn pwrite(&self, _buf: &[u8], _offset: u64, _flags: Flags) -> Result<()> {
        Ok(())
    }
    fn flush(&self, _flags: Flags) -> Result<()> {
        Ok(())
    }
}

nbdhost_plugin!(Disk);

#[derive(Default)]
struct Pass;
struct PassHandle;

#[callbacks]
impl Filter for Pass {
    const NAME: &'static str = "pass";
    const DESCRIPTION: &'static str = "a filter defining one request";
    type Handle = PassHandle;

    fn nonblocking(&self) -> bool {
        true
    }
    fn open(&self, next: &NextOpener, readonly: bool, export_name: &str) -> Result<PassHandle> {
        next.open(readonly, export_name)?;
        Ok(PassHandle)
    }
}

#[callbacks]
impl FilterHandle for PassHandle {
    fn pread(
        &self,
        next: &nbdhost_plugin_api::Next,
        buf: &mut [u8],
        offset: u64,
        flags: Flags,
    ) -> Result<()> {
        next.pread(buf, offset, flags)
    }
}

nbdhost_filter!(Pass);

// SAFETY: every field of the host table is an integer or an optional
// function pointer, for which all-zero bytes are valid (0 and None).
static HOST: abi::Host = unsafe { std::mem::zeroed() };

fn plugin_table() -> &'static abi::Plugin {
    // SAFETY: HOST is a static table, as the entry point requires, and
    // the table it returns lives as long as this process.
    unsafe { &*nbdhost_plugin_entry(&HOST) }
}

fn filter_table() -> &'static abi::Filter {
    // SAFETY: as for `plugin_table`.
    unsafe { &*nbdhost_filter_entry(&HOST) }
}

#[test]
fn a_plugins_defined_callbacks_are_registered() {
    let t = plugin_table();
    assert!(t.config.is_some());
    assert!(t.get_size.is_some());
    assert!(t.pread.is_some());
    assert!(t.pwrite.is_some());
    assert!(t.flush.is_some());
}

#[test]
fn a_plugins_undefined_callbacks_are_left_to_the_server() {
    let t = plugin_table();
    assert!(
        t.can_write.is_none(),
        "the server's default: pwrite is there"
    );
    assert!(t.can_flush.is_none());
    assert!(t.trim.is_none());
    assert!(t.zero.is_none());
    assert!(t.extents.is_none());
    assert!(t.cache.is_none());
    assert!(t.list_exports.is_none());
    assert!(t.default_export.is_none());
    assert!(t.preconnect.is_none());
    assert!(t.get_ready.is_none());
    assert!(t.capabilities.is_none(), "nonblocking is not defined");
}

#[test]
fn the_lifecycle_callbacks_are_always_registered() {
    let t = plugin_table();
    assert!(t.load.is_some() && t.unload.is_some());
    assert!(t.open.is_some() && t.close.is_some());
    let f = filter_table();
    assert!(f.load.is_some() && f.unload.is_some());
    assert!(f.open.is_some() && f.close.is_some());
}

#[test]
fn a_filter_registers_only_what_it_defines_so_the_rest_passes_down() {
    let t = filter_table();
    assert!(t.pread.is_some());
    assert!(t.capabilities.is_some(), "nonblocking is defined");
    assert!(t.pwrite.is_none());
    assert!(t.get_size.is_none());
    assert!(t.config.is_none());
    assert!(t.startup.is_none());
    assert!(t.prepare.is_none());
    assert!(t.list_exports.is_none());
    assert!(t.default_export.is_none());
}

#[test]
fn a_default_method_answers_as_the_server_would_for_a_null_callback() {
    let h = DiskHandle;
    assert!(h.can_write().unwrap(), "pwrite is defined");
    assert!(h.can_flush().unwrap(), "flush is defined");
    assert!(!h.can_trim().unwrap(), "trim is not");
    assert!(!h.can_extents().unwrap());
    assert!(
        h.can_fast_zero().unwrap(),
        "without zero a fast zero fails at once"
    );
}
