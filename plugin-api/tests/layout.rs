//! The C headers and the Rust definitions in `nbdhost_plugin_api::abi`
//! describe the same memory.
//!
//! A C program compiled against `include/` prints, for every ABI struct,
//! its size and alignment and, for every field in declaration order, its
//! offset, size and kind; then the value of every `#define` constant and
//! the entry symbol names. The Rust side computes the same lines with
//! `size_of`, `offset_of!` and the consts of `abi`, and the test compares
//! them line by line, naming each field or constant that differs.
//!
//! A field present on only one side cannot slip through: the Rust field
//! list must tile the struct exactly (each field at the first suitably
//! aligned offset after the previous one, the last one ending where the
//! struct's size says), and both sides must agree on every offset and on
//! the total size, so an unlisted field on either side leaves a hole or
//! changes the size. A `#define NBDHOST_*` that has no Rust counterpart in
//! the list below fails the test as well.
//!
//! Adding a field to the ABI is one identifier in [`layouts!`]; adding a
//! constant is one line in [`constants!`].

mod common;

use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, c_void};
use std::mem::{align_of, offset_of, size_of};

use nbdhost_plugin_api::abi;

/// How C and Rust classify a field's type. In C this is a `_Generic`
/// selection (see [`C_PRELUDE`]); every function pointer falls into its
/// `default` branch. A Rust field type outside this list is a compile error
/// here, which is the cue to extend both sides.
trait Kind {
    const KIND: &'static str;
}
impl Kind for u64 {
    const KIND: &'static str = "u64";
}
impl Kind for u32 {
    const KIND: &'static str = "u32";
}
impl Kind for c_int {
    const KIND: &'static str = "int";
}
impl Kind for *const c_char {
    const KIND: &'static str = "cstr";
}
impl Kind for *mut c_void {
    const KIND: &'static str = "voidptr";
}
impl<F> Kind for Option<F> {
    // Only function pointers are wrapped in `Option` in the ABI.
    const KIND: &'static str = "fnptr";
}

const C_PRELUDE: &str = r#"#include <stddef.h>
#include <stdio.h>
#include "nbdhost-plugin.h"
#include "nbdhost-filter.h"

#define KIND(e) _Generic ((e),          \
    uint64_t: "u64",                      \
    uint32_t: "u32",                      \
    int: "int",                           \
    const char *: "cstr",                 \
    void *: "voidptr",                    \
    default: "fnptr")
#define FIELD(s, f)                                                     \
  printf (#s "." #f " offset %zu size %zu kind %s\n",                   \
          offsetof (struct s, f), sizeof (((struct s *) 0)->f),         \
          KIND (((struct s *) 0)->f))
#define STRUCT(s)                                                       \
  printf (#s " size %zu align %zu\n", sizeof (struct s), _Alignof (struct s))
#define CONST(c) printf (#c " %lld\n", (long long) (c))
#define STRING(c) printf (#c " %s\n", c)
#define TYPE(t) printf (#t " size %zu\n", sizeof (t))

int
main (void)
{
"#;

/// One field as Rust lays it out.
struct Field {
    name: &'static str,
    offset: usize,
    size: usize,
    align: usize,
    kind: &'static str,
}

/// One ABI struct as Rust lays it out, fields in declaration order.
struct Layout {
    c_name: &'static str,
    size: usize,
    align: usize,
    fields: Vec<Field>,
}

/// Size, alignment and kind of the field that `get` projects to.
fn field_facts<T, F: Kind>(_get: fn(&T) -> &F) -> (usize, usize, &'static str) {
    (size_of::<F>(), align_of::<F>(), F::KIND)
}

/// `"c_struct_name" => RustType { field, field, ... }`: each field is named
/// once and yields both the C `FIELD` line and the Rust facts.
macro_rules! layouts {
    ($( $cname:ident => $rty:ty { $($field:ident),* $(,)? } )*) => {
        vec![$({
            let fields = vec![$({
                let (size, align, kind) = field_facts(|s: &$rty| &s.$field);
                Field {
                    name: stringify!($field),
                    offset: offset_of!($rty, $field),
                    size,
                    align,
                    kind,
                }
            }),*];
            Layout {
                c_name: stringify!($cname),
                size: size_of::<$rty>(),
                align: align_of::<$rty>(),
                fields,
            }
        }),*]
    };
}

/// `C_NAME => rust_value`: integer constants, printed by C as `long long`.
macro_rules! constants {
    ($( $cname:ident => $value:expr ),* $(,)?) => {
        vec![$( (stringify!($cname), i64::try_from($value).expect("fits in i64")) ),*]
    };
}

fn layouts() -> Vec<Layout> {
    layouts! {
        nbdhost_host => abi::Host {
            struct_size, abi_version, reserved,
            error,
            debug,
            add_extent,
            add_export,
            parse_size,
            read_secret,
            free_secret,
            peer_name,
            export_name,
            debug_flag,
            extents_new,
            extents_free,
            extents_count,
            extents_get,
            last_errno,
            is_tls,
            peer_identity,
            nanosleep,
            log,
            debug_flag_name,
            peer_credentials,
            peer_tls_dn,
            peer_tls_issuer_dn,
            shutdown,
            disconnect,
            stdio_safe,
            connection_id,
            exports_new,
            exports_free,
            exports_count,
            exports_get,
            complete,
            request_then,
        }
        nbdhost_plugin => abi::Plugin {
            struct_size, abi_version, thread_model,
            name, version, description, config_help, magic_config_key,
            load,
            unload,
            config,
            config_complete,
            get_ready,
            preconnect,
            list_exports,
            default_export,
            open,
            close,
            get_size,
            block_size,
            can_write,
            can_flush,
            can_trim,
            can_zero,
            can_fast_zero,
            can_fua,
            can_multi_conn,
            can_cache,
            can_extents,
            is_rotational,
            export_description,
            pread,
            pwrite,
            flush,
            trim,
            zero,
            extents,
            cache,
            capabilities,
            configured_thread_model,
            after_fork,
            dump_plugin,
            local_file,
            async_pread,
            async_pwrite,
            async_flush,
            async_trim,
            async_zero,
            async_cache,
            async_extents,
        }
        nbdhost_next => abi::Next {
            struct_size, opaque,
            get_size,
            block_size,
            can_write,
            can_flush,
            can_trim,
            can_zero,
            can_fast_zero,
            can_fua,
            can_multi_conn,
            can_cache,
            can_extents,
            is_rotational,
            export_description,
            pread,
            pwrite,
            flush,
            trim,
            zero,
            extents,
            cache,
            local_file,
            async_pread,
            async_pwrite,
            async_flush,
            async_trim,
            async_zero,
            async_cache,
            async_extents,
            reopen,
            after,
            background,
            closing,
        }
        nbdhost_next_open => abi::NextOpen { struct_size, opaque, open }
        nbdhost_next_exports => abi::NextExports {
            struct_size, opaque, list_exports, default_export,
        }
        nbdhost_filter => abi::Filter {
            struct_size, abi_version, thread_model,
            name, version, description, config_help,
            load,
            unload,
            config,
            config_complete,
            get_ready,
            preconnect,
            open,
            close,
            get_size,
            block_size,
            can_write,
            can_flush,
            can_trim,
            can_zero,
            can_fast_zero,
            can_fua,
            can_multi_conn,
            can_cache,
            can_extents,
            is_rotational,
            export_description,
            pread,
            pwrite,
            flush,
            trim,
            zero,
            extents,
            cache,
            startup,
            capabilities,
            configured_thread_model,
            after_fork,
            prepare,
            list_exports,
            default_export,
            finalize,
            local_file,
            async_pread,
            async_pwrite,
            async_flush,
            async_trim,
            async_zero,
            async_cache,
            async_extents,
        }
    }
}

fn constants() -> Vec<(&'static str, i64)> {
    constants! {
        NBDHOST_ABI_MAJOR => abi::ABI_MAJOR,
        NBDHOST_ABI_MINOR => abi::ABI_MINOR,
        NBDHOST_ABI_VERSION => abi::ABI_VERSION,
        NBDHOST_THREAD_MODEL_SERIALIZE_CONNECTIONS => abi::THREAD_MODEL_SERIALIZE_CONNECTIONS,
        NBDHOST_THREAD_MODEL_SERIALIZE_ALL_REQUESTS => abi::THREAD_MODEL_SERIALIZE_ALL_REQUESTS,
        NBDHOST_THREAD_MODEL_SERIALIZE_REQUESTS => abi::THREAD_MODEL_SERIALIZE_REQUESTS,
        NBDHOST_THREAD_MODEL_PARALLEL => abi::THREAD_MODEL_PARALLEL,
        NBDHOST_FLAG_MAY_TRIM => abi::FLAG_MAY_TRIM,
        NBDHOST_FLAG_FUA => abi::FLAG_FUA,
        NBDHOST_FLAG_REQ_ONE => abi::FLAG_REQ_ONE,
        NBDHOST_FLAG_FAST_ZERO => abi::FLAG_FAST_ZERO,
        NBDHOST_FUA_NONE => abi::SUPPORT_NONE,
        NBDHOST_FUA_EMULATE => abi::SUPPORT_EMULATE,
        NBDHOST_FUA_NATIVE => abi::SUPPORT_NATIVE,
        NBDHOST_CACHE_NONE => abi::SUPPORT_NONE,
        NBDHOST_CACHE_EMULATE => abi::SUPPORT_EMULATE,
        NBDHOST_CACHE_NATIVE => abi::SUPPORT_NATIVE,
        NBDHOST_NONBLOCKING => abi::NONBLOCKING,
        NBDHOST_SYNCHRONOUS => abi::SYNCHRONOUS,
        NBDHOST_LOG_ERROR => abi::LOG_ERROR,
        NBDHOST_LOG_WARNING => abi::LOG_WARNING,
        NBDHOST_LOG_INFO => abi::LOG_INFO,
        NBDHOST_LOG_DEBUG => abi::LOG_DEBUG,
        NBDHOST_EXTENT_HOLE => abi::EXTENT_HOLE,
        NBDHOST_EXTENT_ZERO => abi::EXTENT_ZERO,
        NBDHOST_CONFIG_TAKEN => abi::CONFIG_TAKEN,
        NBDHOST_CONFIG_PASS => abi::CONFIG_PASS,
    }
}

/// String constants: the entry symbols.
fn strings() -> Vec<(&'static str, &'static str)> {
    vec![
        ("NBDHOST_PLUGIN_ENTRY", abi::PLUGIN_ENTRY),
        ("NBDHOST_FILTER_ENTRY", abi::FILTER_ENTRY),
        ("NBDHOST_PLUGIN_ADAPTER_ENTRY", abi::PLUGIN_ADAPTER_ENTRY),
        ("NBDHOST_FILTER_ADAPTER_ENTRY", abi::FILTER_ADAPTER_ENTRY),
    ]
}

/// Typedefs of the entry points (function pointers, so only the size).
fn typedefs() -> Vec<(&'static str, usize)> {
    vec![
        ("nbdhost_plugin_entry_fn", size_of::<abi::PluginEntry>()),
        ("nbdhost_filter_entry_fn", size_of::<abi::FilterEntry>()),
        (
            "nbdhost_plugin_adapter_entry_fn",
            size_of::<abi::PluginAdapterEntry>(),
        ),
        (
            "nbdhost_filter_adapter_entry_fn",
            size_of::<abi::FilterAdapterEntry>(),
        ),
    ]
}

/// Every `#define NBDHOST_*` in the headers, except the include guards.
fn header_defines() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for header in ["nbdhost-plugin.h", "nbdhost-filter.h"] {
        let path = common::include_dir().join(header);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        for line in text.lines() {
            let Some(rest) = line.trim_start().strip_prefix("#define") else {
                continue;
            };
            let name = rest.split_whitespace().next().unwrap_or("");
            // Function-like macros (NBDHOST_REGISTER_*) and the symbol
            // attribute are conveniences of the header, not values the
            // ABI has: the C plugin tests exercise them.
            if name.contains('(') || name == "NBDHOST_EXPORT" {
                continue;
            }
            if name.starts_with("NBDHOST_") && !name.ends_with("_H") {
                out.push((header.to_string(), name.to_string()));
            }
        }
    }
    out
}

/// Check that `layout.fields` covers the whole struct with no room for an
/// unlisted field: each field sits at the first offset after the previous
/// one that its alignment allows, and the last one is followed only by the
/// tail padding that the struct's alignment requires.
fn check_complete(layout: &Layout, problems: &mut Vec<String>) {
    let round_up = |n: usize, a: usize| n.div_ceil(a) * a;
    let mut end = 0;
    for f in &layout.fields {
        let expected = round_up(end, f.align);
        if f.offset != expected {
            problems.push(format!(
                "{}.{}: at offset {} but the previous listed field ends at {end}: the field \
                 list is out of order or misses a field before it",
                layout.c_name, f.name, f.offset
            ));
        }
        end = f.offset + f.size;
    }
    if round_up(end, layout.align) != layout.size {
        problems.push(format!(
            "{}: the listed fields end at {end} but the struct is {} bytes: a field after the \
             last listed one is missing from the list",
            layout.c_name, layout.size
        ));
    }
}

/// The key of an output line: its first word (struct, field or constant).
fn key(line: &str) -> &str {
    line.split_whitespace().next().unwrap_or("")
}

#[test]
fn c_headers_and_rust_agree() {
    let layouts = layouts();
    let constants = constants();
    let strings = strings();
    let typedefs = typedefs();
    let mut problems = Vec::new();

    // The C program and, line for line, what Rust expects it to print.
    let mut c = String::from(C_PRELUDE);
    let mut rust = Vec::new();
    for l in &layouts {
        check_complete(l, &mut problems);
        c.push_str(&format!("  STRUCT ({});\n", l.c_name));
        rust.push(format!("{} size {} align {}", l.c_name, l.size, l.align));
        for f in &l.fields {
            c.push_str(&format!("  FIELD ({}, {});\n", l.c_name, f.name));
            rust.push(format!(
                "{}.{} offset {} size {} kind {}",
                l.c_name, f.name, f.offset, f.size, f.kind
            ));
        }
    }
    for (name, value) in &constants {
        c.push_str(&format!("  CONST ({name});\n"));
        rust.push(format!("{name} {value}"));
    }
    for (name, value) in &strings {
        c.push_str(&format!("  STRING ({name});\n"));
        rust.push(format!("{name} {value}"));
    }
    for (name, size) in &typedefs {
        c.push_str(&format!("  TYPE ({name});\n"));
        rust.push(format!("{name} size {size}"));
    }
    c.push_str("  return 0;\n}\n");

    // Every constant the headers define is checked.
    for (header, name) in header_defines() {
        let known =
            constants.iter().any(|(n, _)| *n == name) || strings.iter().any(|(n, _)| *n == name);
        if !known {
            problems.push(format!(
                "{header} defines {name}, which has no Rust counterpart in this test \
                 (add it to abi.rs and to constants!/strings() here)"
            ));
        }
    }

    let dir = common::TempDir::new("layout");
    let src = dir.path("layout.c");
    let exe = dir.path("layout");
    std::fs::write(&src, &c).unwrap();
    let include = common::include_dir();
    common::cc(&[
        "-std=c11".as_ref(),
        "-Wall".as_ref(),
        "-Wextra".as_ref(),
        "-Werror".as_ref(),
        "-I".as_ref(),
        include.as_os_str(),
        "-o".as_ref(),
        exe.as_os_str(),
        src.as_os_str(),
    ]);
    let out = std::process::Command::new(&exe)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()));
    assert!(
        out.status.success(),
        "{} failed: {}",
        exe.display(),
        out.status
    );
    let c_view = String::from_utf8(out.stdout).expect("the C program prints ASCII");
    let c_lines: Vec<&str> = c_view.lines().collect();

    let c_by_key: BTreeMap<&str, &str> = c_lines.iter().map(|l| (key(l), *l)).collect();
    for r in &rust {
        match c_by_key.get(key(r)) {
            None => problems.push(format!("{}: C printed nothing for it", key(r))),
            Some(c_line) if c_line != r => problems.push(format!(
                "{}: C says `{}`, Rust says `{}`",
                key(r),
                c_line[key(r).len()..].trim(),
                r[key(r).len()..].trim()
            )),
            Some(_) => {}
        }
    }
    // Same lines in the same order (field order is part of the ABI).
    if problems.is_empty() && c_lines != rust.iter().map(String::as_str).collect::<Vec<_>>() {
        problems.push(format!(
            "the C program's output differs in order or length:\nC:\n{c_view}\nRust:\n{}",
            rust.join("\n")
        ));
    }

    assert!(
        problems.is_empty(),
        "the C headers and nbdhost_plugin_api::abi disagree:\n  {}",
        problems.join("\n  ")
    );
}
