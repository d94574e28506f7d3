//! Writes the man pages (`edgefn.1`, `edgefn-run.1`...) and the bash completion (`edgefn.bash`) for the packages,
//! from the same clap definition as `edgefn --help`: `cargo run --example docs -- OUT_DIR`.
//! An example, not a subcommand, so the daemon carries neither generator.

use std::path::PathBuf;

use clap::CommandFactory;
use edgefn::cli::Cli;

fn main() -> std::io::Result<()> {
    let out = PathBuf::from(std::env::args_os().nth(1).expect("usage: docs OUT_DIR"));
    std::fs::create_dir_all(&out)?;
    // edgefn.1 and a page per subcommand (edgefn-run.1...), which edgefn.1 names.
    clap_mangen::generate_to(Cli::command(), &out)?;
    let mut completion = Vec::new();
    clap_complete::generate(clap_complete::Shell::Bash, &mut Cli::command(), "edgefn", &mut completion);
    std::fs::write(out.join("edgefn.bash"), completion)
}
