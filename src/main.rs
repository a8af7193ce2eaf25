//! The `mailgrid` command.

fn main() -> std::process::ExitCode {
    mailgrid::cli::main()
}
