//! Compiles the printf-style half of nbdkit's API, which stable Rust
//! cannot define (variadic functions).

fn main() {
    println!("cargo:rerun-if-changed=src/format.c");
    cc::Build::new()
        .file("src/format.c")
        .warnings(true)
        .extra_warnings(true)
        .warnings_into_errors(true)
        .compile("nbdkitformat");
}
