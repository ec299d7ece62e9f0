//! `--dump-config` and `--dump-plugin`: facts about this build and about a
//! loaded layer, one `key=value` per line as nbdkit prints them.

use crate::layers::{chain, LayerInfo};
use crate::protocol::export::MAX_PAYLOAD;

/// `--dump-config`: build and path settings.
pub fn config() {
    println!(
        "binary={}",
        std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    );
    println!("version={}", env!("CARGO_PKG_VERSION"));
    println!(
        "abi_version={}.{}",
        nbdhost_plugin_api::abi::ABI_MAJOR,
        nbdhost_plugin_api::abi::ABI_MINOR
    );
    for kind in ["plugin", "filter"] {
        let dirs: Vec<String> = chain::layer_dirs(kind)
            .iter()
            .map(|d| d.display().to_string())
            .collect();
        println!("{kind}dir={}", dirs.join(":"));
    }
    println!("host_cpu={}", std::env::consts::ARCH);
    println!("host_os={}", std::env::consts::OS);
    println!("max_payload={}", MAX_PAYLOAD);
}

/// `--dump-plugin`: one layer's facts.
pub fn layer(i: &LayerInfo) {
    println!("path={}", i.path.display());
    println!("name={}", i.name);
    println!("version={}", i.version);
    println!("description={}", i.description);
    println!(
        "abi_version={}.{}",
        i.abi_version >> 16,
        i.abi_version & 0xffff
    );
    println!("struct_size={}", i.struct_size);
    println!("thread_model={}", thread_model_name(i.thread_model));
    if let Some(k) = &i.magic_config_key {
        println!("magic_config_key={k}");
    }
    if !i.config_help.is_empty() {
        println!("config_help=");
        println!("{}", i.config_help);
    }
}

fn thread_model_name(m: nbdhost_plugin_api::ThreadModel) -> &'static str {
    use nbdhost_plugin_api::ThreadModel::*;
    match m {
        SerializeConnections => "serialize_connections",
        SerializeAllRequests => "serialize_all_requests",
        SerializeRequests => "serialize_requests",
        Parallel => "parallel",
    }
}
