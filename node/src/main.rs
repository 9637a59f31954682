//! The `p2ptrain` binary; everything lives in the library so tests can reuse it.

fn main() -> std::process::ExitCode {
    p2ptrain_node::cli::main_entry()
}
