//! The `tollgate` binary: parse the command line and hand over to
//! `tollgate::cli`. Errors reach the user through anyhow's context chain.

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = tollgate::cli::Cli::parse();
    match tollgate::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tollgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}
