//! The `p2ptrain` binary, rebuilt inside the tests crate so tests can find it.

fn main() -> std::process::ExitCode {
    p2ptrain_node::cli::main_entry()
}
