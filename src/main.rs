//! The `lifeboat` binary: parses the command line and hands over to [`lifeboat::cli`].

fn main() -> std::process::ExitCode {
    lifeboat::cli::main()
}
