//! The C headers and the Rust definitions in `nbdhost_plugin_api::abi`
//! describe the same memory: every field of every ABI struct sits at the
//! same offset with the same size, and the constants agree. A C program
//! compiled against the headers prints its view; the test compares.

use std::mem::{offset_of, size_of};
use std::path::Path;
use std::process::Command;

use nbdhost_plugin_api::abi;

/// One line per struct size and field offset, the same text on both sides.
macro_rules! layout {
    ($( $cname:literal => $rty:ty { $($field:ident),* $(,)? } )*) => {{
        let mut c = String::new();
        let mut rust = Vec::new();
        $(
            c.push_str(&format!("  printf(\"{0} size %zu\\n\", sizeof (struct {0}));\n", $cname));
            rust.push(format!("{} size {}", $cname, size_of::<$rty>()));
            $(
                c.push_str(&format!(
                    "  printf(\"{0}.{1} %zu\\n\", offsetof (struct {0}, {1}));\n",
                    $cname, stringify!($field)
                ));
                rust.push(format!("{}.{} {}", $cname, stringify!($field), offset_of!($rty, $field)));
            )*
        )*
        (c, rust)
    }};
}

#[test]
fn c_headers_and_rust_agree() {
    let (c_body, rust) = layout! {
        "nbdhost_host" => abi::Host {
            struct_size, abi_version, reserved, error, debug, add_extent, add_export, parse_size,
            read_secret, free_secret, peer_name, export_name, debug_flag, extents_new, extents_free,
            extents_count, extents_get, last_errno, is_tls, peer_identity,
        }
        "nbdhost_plugin" => abi::Plugin {
            struct_size, abi_version, thread_model, name, version, description, config_help,
            magic_config_key, load, unload, config, config_complete, get_ready, preconnect,
            list_exports, default_export, open, close, get_size, block_size, can_write, can_flush,
            can_trim, can_zero, can_fast_zero, can_fua, can_multi_conn, can_cache, can_extents,
            is_rotational, export_description, pread, pwrite, flush, trim, zero, extents, cache,
        }
        "nbdhost_next" => abi::Next {
            struct_size, opaque, get_size, block_size, can_write, can_flush, can_trim, can_zero,
            can_fast_zero, can_fua, can_multi_conn, can_cache, can_extents, is_rotational,
            export_description, pread, pwrite, flush, trim, zero, extents, cache,
        }
        "nbdhost_next_open" => abi::NextOpen { struct_size, opaque, open }
        "nbdhost_filter" => abi::Filter {
            struct_size, abi_version, thread_model, name, version, description, config_help, load,
            unload, config, config_complete, get_ready, preconnect, open, close, get_size,
            block_size, can_write, can_flush, can_trim, can_zero, can_fast_zero, can_fua,
            can_multi_conn, can_cache, can_extents, is_rotational, export_description, pread,
            pwrite, flush, trim, zero, extents, cache,
        }
    };
    let mut rust = rust;
    let consts: [(&str, i64); 22] = [
        ("NBDHOST_ABI_MAJOR", abi::ABI_MAJOR.into()),
        ("NBDHOST_ABI_MINOR", abi::ABI_MINOR.into()),
        ("NBDHOST_ABI_VERSION", abi::ABI_VERSION.into()),
        (
            "NBDHOST_THREAD_MODEL_SERIALIZE_CONNECTIONS",
            abi::THREAD_MODEL_SERIALIZE_CONNECTIONS.into(),
        ),
        (
            "NBDHOST_THREAD_MODEL_SERIALIZE_ALL_REQUESTS",
            abi::THREAD_MODEL_SERIALIZE_ALL_REQUESTS.into(),
        ),
        (
            "NBDHOST_THREAD_MODEL_SERIALIZE_REQUESTS",
            abi::THREAD_MODEL_SERIALIZE_REQUESTS.into(),
        ),
        (
            "NBDHOST_THREAD_MODEL_PARALLEL",
            abi::THREAD_MODEL_PARALLEL.into(),
        ),
        ("NBDHOST_FLAG_MAY_TRIM", abi::FLAG_MAY_TRIM.into()),
        ("NBDHOST_FLAG_FUA", abi::FLAG_FUA.into()),
        ("NBDHOST_FLAG_REQ_ONE", abi::FLAG_REQ_ONE.into()),
        ("NBDHOST_FLAG_FAST_ZERO", abi::FLAG_FAST_ZERO.into()),
        ("NBDHOST_FUA_NONE", abi::SUPPORT_NONE.into()),
        ("NBDHOST_FUA_EMULATE", abi::SUPPORT_EMULATE.into()),
        ("NBDHOST_FUA_NATIVE", abi::SUPPORT_NATIVE.into()),
        ("NBDHOST_CACHE_NONE", abi::SUPPORT_NONE.into()),
        ("NBDHOST_CACHE_EMULATE", abi::SUPPORT_EMULATE.into()),
        ("NBDHOST_CACHE_NATIVE", abi::SUPPORT_NATIVE.into()),
        ("NBDHOST_EXTENT_HOLE", abi::EXTENT_HOLE.into()),
        ("NBDHOST_EXTENT_ZERO", abi::EXTENT_ZERO.into()),
        ("NBDHOST_CONFIG_TAKEN", abi::CONFIG_TAKEN.into()),
        ("NBDHOST_CONFIG_PASS", abi::CONFIG_PASS.into()),
        ("0", 0),
    ];
    let mut c_consts = String::new();
    for (name, value) in &consts[..consts.len() - 1] {
        c_consts.push_str(&format!(
            "  printf(\"{name} %lld\\n\", (long long) ({name}));\n"
        ));
        rust.push(format!("{name} {value}"));
    }
    c_consts
        .push_str("  printf(\"entry %s %s\\n\", NBDHOST_PLUGIN_ENTRY, NBDHOST_FILTER_ENTRY);\n");
    rust.push(format!("entry {} {}", abi::PLUGIN_ENTRY, abi::FILTER_ENTRY));

    let dir = std::env::temp_dir().join(format!("nbdhost-layout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("layout.c");
    std::fs::write(
        &src,
        format!(
            "#include <stddef.h>\n#include <stdio.h>\n#include \"nbdhost-filter.h\"\nint main (void)\n{{\n{c_body}{c_consts}  return 0;\n}}\n"
        ),
    )
    .unwrap();
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("include");
    let exe = dir.join("layout");
    let cc = Command::new("cc")
        .args(["-Wall", "-Werror", "-o"])
        .arg(&exe)
        .arg("-I")
        .arg(&include)
        .arg(&src)
        .output()
        .expect("cc is needed to check the C headers");
    assert!(
        cc.status.success(),
        "the headers do not compile: {}",
        String::from_utf8_lossy(&cc.stderr)
    );
    let out = Command::new(&exe).output().unwrap();
    let c_view = String::from_utf8(out.stdout).unwrap();
    let c_lines: Vec<&str> = c_view.lines().collect();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(c_lines.len(), rust.len());
    for (c, r) in c_lines.iter().zip(&rust) {
        assert_eq!(c, r, "C and Rust disagree");
    }
}
