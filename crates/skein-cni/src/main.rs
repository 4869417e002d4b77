//! The `skein-cni` executable (see the library's docs for what it does).

fn main() -> std::process::ExitCode {
    skein_cni::cli::cli_main()
}
