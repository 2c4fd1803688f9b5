fn main() -> std::process::ExitCode {
    edgebridge::cli::main()
}
