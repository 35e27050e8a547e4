fn main() -> std::process::ExitCode {
    xlpipe::cli::main()
}
