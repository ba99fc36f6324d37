//! Writes the man pages (clap_mangen) and shell completions (clap_complete)
//! the Debian package ships, from the CLI's own definition, so they never
//! drift from `--help`:
//!
//!   cargo run --example gen_assets -- target/assets
//!
//! makes `man/tollgate.1`, `man/tollgate-<command>.1` for each command, and
//! `completions/{tollgate.bash,_tollgate,tollgate.fish}`. scripts/package
//! runs it before `cargo deb`.

use clap::CommandFactory;
use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "target/assets".into()),
    );
    let man = out.join("man");
    let comp = out.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&comp)?;
    let cmd = tollgate::cli::Cli::command();
    clap_mangen::generate_to(cmd.clone(), &man)?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut cmd.clone(), "tollgate", &comp)?;
    }
    let mut n = 0;
    for d in [&man, &comp] {
        for e in std::fs::read_dir(d)? {
            println!("{}", e?.path().display());
            n += 1;
        }
    }
    eprintln!("gen_assets: {n} files in {}", out.display());
    Ok(())
}
