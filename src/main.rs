//! The `tollgate` binary: parse the command line and hand over to
//! `tollgate::cli`. Errors reach the user through anyhow's context chain.

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = tollgate::cli::Cli::parse();
    match tollgate::cli::run(cli) {
        Ok(code) => code,
        // `tollgate clients list | head`: the reader left; nothing went
        // wrong that the user should hear about.
        Err(e)
            if e.chain().any(|c| {
                let pipe = Some(std::io::ErrorKind::BrokenPipe);
                c.downcast_ref::<std::io::Error>().map(|io| io.kind()) == pipe
                    || c.downcast_ref::<serde_json::Error>()
                        .and_then(|j| j.io_error_kind())
                        == pipe
            }) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tollgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}
