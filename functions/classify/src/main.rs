//! The `classify` WASI command: an image on stdin, its ImageNet class on stdout.
//!
//! The model is the host's, reached by name through wasi-nn (`MODEL`, default
//! `efficientnet-lite0`). Its labels are read from the model file itself (`MODEL_FILE`, in a
//! directory the config grants), so there is no second copy to drift. `EDGEFN_FORMAT=text`
//! writes the seed's sentence instead of JSON.

use std::io::{self, Read, Write};
use std::process::ExitCode;

const DEFAULT_MODEL: &str = "efficientnet-lite0";
const DEFAULT_MODEL_FILE: &str = "/models/efficientnet_lite0.tflite";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("classify: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let model = std::env::var("MODEL").unwrap_or_else(|_| DEFAULT_MODEL.into());
    let model_file = std::env::var("MODEL_FILE").unwrap_or_else(|_| DEFAULT_MODEL_FILE.into());

    let mut input = Vec::new();
    io::stdin().read_to_end(&mut input).map_err(|e| format!("cannot read stdin: {e}"))?;
    let pixels = classify::preprocess(&input)?;

    let file = std::fs::File::open(&model_file)
        .map_err(|e| format!("cannot open {model_file} for the labels ({e}); grant its directory in the config"))?;
    let labels = classify::labels_from_model(file)?;

    let dims = [1, classify::SIZE, classify::SIZE, 3];
    let output = classify::nn::infer(&model, &dims, &pixels, labels.len() * 4)?;
    let top = classify::rank(&output, &labels)?;

    let text = match std::env::var("EDGEFN_FORMAT").as_deref() {
        Ok("text") => classify::sentence(&top[0]),
        _ => classify::to_json(&top, &model),
    };
    io::stdout().write_all(text.as_bytes()).map_err(|e| format!("cannot write stdout: {e}"))
}
