//! nbdkit's printf-style functions under the names plugins call. Their
//! bodies are in `format.c`; these exported symbols jump there without
//! touching a register or the stack, so the C functions receive the
//! caller's arguments exactly as a direct call would have passed them.
//!
//! The indirection exists because only Rust items are exported from a
//! `cdylib` (a C function linked in stays hidden), and stable Rust cannot
//! define a variadic function itself.

#[cfg(target_arch = "x86_64")]
macro_rules! tail_jump {
    () => {
        "jmp {}"
    };
}
#[cfg(target_arch = "aarch64")]
macro_rules! tail_jump {
    () => {
        "b {}"
    };
}
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!("the nbdkit adapter needs a tail jump for this architecture");

/// Export `$name`, whose body is the C function `$target`.
macro_rules! forward {
    ($($name:ident => $target:ident),* $(,)?) => {
        // Declared without parameters: only their addresses are taken.
        unsafe extern "C" {
            $(fn $target();)*
        }
        $(
            /// See nbdkit's manual page of the same name.
            // SAFETY: a single jump to a C function of the same signature;
            // nothing is read or written before it.
            #[unsafe(naked)]
            #[unsafe(no_mangle)]
            pub unsafe extern "C" fn $name() {
                core::arch::naked_asm!(tail_jump!(), sym $target)
            }
        )*
    };
}

forward! {
    nbdkit_error => nbdhost_nbdkit_error,
    nbdkit_verror => nbdhost_nbdkit_verror,
    nbdkit_debug => nbdhost_nbdkit_debug,
    nbdkit_vdebug => nbdhost_nbdkit_vdebug,
    nbdkit_printf_intern => nbdhost_nbdkit_printf_intern,
    nbdkit_vprintf_intern => nbdhost_nbdkit_vprintf_intern,
}
