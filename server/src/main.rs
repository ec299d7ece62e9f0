//! The `nbdhost` binary.

fn main() {
    std::process::exit(nbdhost::cli::main());
}
