//! The `grayscale` WASI command: an image on stdin, a grayscale image on stdout.

use std::io::{self, Read, Write};
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut input = Vec::new();
    if let Err(e) = io::stdin().read_to_end(&mut input) {
        eprintln!("grayscale: cannot read stdin: {e}");
        return ExitCode::FAILURE;
    }
    match grayscale::grayscale(&input) {
        Ok(out) => match io::stdout().write_all(&out) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("grayscale: cannot write stdout: {e}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("grayscale: {e}");
            ExitCode::FAILURE
        }
    }
}
