//! Calling into the nbdkit plugin, and turning what it reported on the way
//! (`nbdkit_error`, `nbdkit_set_error`, `errno`) into nbdhost's terms.
//!
//! nbdkit logs every `nbdkit_error` at once and sends the client the errno
//! from `nbdkit_set_error`, else `errno` if the plugin preserves it, else
//! `EIO`. Here, while a callback runs, its last message is held back and
//! becomes the recorded error if the callback fails, so the server logs it
//! once with the request it belongs to; earlier messages, and those of a
//! callback that succeeds or of the plugin's own threads, are logged at
//! once, as nbdkit does.
//!
//! Strings the plugin interns (`nbdkit_strdup_intern` and kin) live as
//! long as nbdkit promises: those made in a connection's callbacks until
//! its handle closes, the others (made while loading or configuring, or in
//! `preconnect`, `list_exports` and `default_export`) until unload, stored
//! once per distinct value.

use std::cell::RefCell;
use std::collections::HashSet;
use std::ffi::{c_char, c_int, CStr, CString};
use std::sync::Mutex;

use nbdhost_plugin_api::abi;

use crate::host;

/// Where strings interned during the current call belong.
#[derive(Clone, Copy)]
pub enum Scope {
    /// Outside any connection's handle: kept until unload.
    Global,
    /// Inside the plugin's `open`: collected, then given to the handle.
    Opening,
    /// Inside a callback for this open handle.
    Handle(*const Interned),
}

/// The strings a handle owns, freed when it closes.
#[derive(Default)]
pub struct Interned(Mutex<Vec<CString>>);

impl Interned {
    fn keep(&self, s: CString) -> *const c_char {
        let p = s.as_ptr();
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(s);
        p
    }

    /// Take over strings collected while the handle was opened.
    pub fn adopt(&self, collected: Vec<CString>) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(collected);
    }
}

/// What the current thread's call into the plugin has reported so far.
struct CallState {
    depth: u32,
    errno: c_int,
    message: Option<CString>,
    scope: Scope,
    opening: Vec<CString>,
}

thread_local! {
    static STATE: RefCell<CallState> = const {
        RefCell::new(CallState {
            depth: 0,
            errno: 0,
            message: None,
            scope: Scope::Global,
            opening: Vec::new(),
        })
    };
}

/// Strings interned outside any handle, one copy of each.
static GLOBAL: Mutex<Option<HashSet<Box<CStr>>>> = Mutex::new(None);

/// What the plugin said when it failed without `nbdkit_set_error`.
#[derive(Clone, Copy)]
pub struct ErrnoPolicy {
    /// The plugin's `errno_is_preserved`: its errno means something.
    pub preserved: bool,
}

/// Run `f`, one call into the plugin made in `scope`; `failed` says
/// whether its result means failure, which is then recorded with the
/// server as the plugin reported it.
pub fn call<R>(
    policy: ErrnoPolicy,
    scope: Scope,
    f: impl FnOnce() -> R,
    failed: impl FnOnce(&R) -> bool,
) -> R {
    let saved = STATE.with(|s| {
        let mut s = s.borrow_mut();
        s.depth += 1;
        let saved = (s.errno, s.message.take(), s.scope);
        s.errno = 0;
        s.scope = scope;
        saved
    });
    let r = f();
    // Read before anything else can change it.
    let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    let (set, message) = STATE.with(|s| {
        let mut s = s.borrow_mut();
        s.depth -= 1;
        let out = (s.errno, s.message.take());
        (s.errno, s.message, s.scope) = saved;
        out
    });
    if failed(&r) {
        let chosen = if set != 0 {
            set
        } else if policy.preserved && errno != 0 {
            errno
        } else {
            0
        };
        // A host service the plugin called (parse_size, read_secret, …)
        // may have recorded a better reason already; keep it unless the
        // plugin said more (a message or nbdkit_set_error: the errno a
        // plugin preserves is then only the service's own).
        if set != 0 || message.is_some() || host::recorded_errno() == 0 {
            host::error(
                if chosen == 0 { libc::EIO } else { chosen },
                message.as_deref(),
            );
        }
    } else if let Some(m) = message {
        host::log(abi::LOG_ERROR, &m);
    }
    r
}

/// `nbdkit_error`: hold the message for the failure it announces, or log
/// it now outside a call.
pub fn report(msg: &CStr) {
    let earlier = STATE.with(|s| {
        let mut s = s.borrow_mut();
        if s.depth == 0 {
            return Some(msg.to_owned());
        }
        s.message.replace(msg.to_owned())
    });
    if let Some(m) = earlier {
        host::log(abi::LOG_ERROR, &m);
    }
}

/// `nbdkit_set_error`: the errno the client gets if this call fails.
pub fn set_errno(errnum: c_int) {
    STATE.with(|s| s.borrow_mut().errno = errnum);
}

/// Report `msg` and the errno to go with it.
pub fn fail(errnum: c_int, msg: &str) {
    set_errno(errnum);
    report(&host::c(msg));
}

/// A copy of `s` that lives as long as the current scope promises.
pub fn intern(s: CString) -> *const c_char {
    let scope = STATE.with(|st| st.borrow().scope);
    match scope {
        Scope::Handle(h) => {
            // SAFETY: a handle's strings are set as the scope only while
            // one of its callbacks runs, so the handle is alive.
            unsafe { &*h }.keep(s)
        }
        Scope::Opening => STATE.with(|st| {
            let p = s.as_ptr();
            st.borrow_mut().opening.push(s);
            p
        }),
        Scope::Global => keep(s),
    }
}

/// A copy of `s` that lives until unload, stored once per value.
pub fn keep(s: CString) -> *const c_char {
    let mut g = GLOBAL.lock().unwrap_or_else(|e| e.into_inner());
    let set = g.get_or_insert_with(HashSet::new);
    let boxed = s.into_boxed_c_str();
    if let Some(kept) = set.get(&boxed) {
        return kept.as_ptr();
    }
    let p = boxed.as_ptr();
    set.insert(boxed);
    p
}

/// The strings interned during the `open` that just returned.
pub fn take_opening() -> Vec<CString> {
    STATE.with(|s| std::mem::take(&mut s.borrow_mut().opening))
}

/// Free what was interned outside handles, at unload.
pub fn forget_global() {
    *GLOBAL.lock().unwrap_or_else(|e| e.into_inner()) = None;
}
