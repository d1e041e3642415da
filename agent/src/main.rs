//! `tollgate`: the agent daemon and its CLI in one binary.

fn main() -> std::process::ExitCode {
    tollgate_agent::cli::main()
}
