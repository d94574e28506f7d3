//! The `edgefn` command: run the daemon, invoke or precompile a function, check a config.
//!
//! Every failure ends with one line on stderr naming the cause and a non-zero exit code.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use edgefn::config::Config;
use edgefn::metrics::Metrics;
use edgefn::runtime::{Runtime, aot};

/// Runs ahead-of-time compiled WebAssembly functions on camera frames.
///
/// Functions are WASI command modules: the frame on stdin, the result on stdout. Each call runs
/// in a fresh sandbox with memory, time and output limits, and sees nothing of the host that
/// its config does not grant.
#[derive(Parser)]
#[command(version, propagate_version = true)]
struct Cli {
    /// Configuration file (TOML). Environment variables EDGEFN__SECTION__KEY override it.
    #[arg(long, short, global = true, env = "EDGEFN_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: load the functions and serve the HTTP API until SIGTERM or Ctrl-C.
    Run,
    /// Run one function locally with its configured limits: stdin in, stdout out.
    ///
    /// Example: edgefn invoke grayscale < cat.jpg > gray.png
    Invoke {
        /// Function name, as served at /v1/functions/NAME.
        name: String,
        /// Extra environment variable for the function (repeatable).
        #[arg(long = "env", short = 'e', value_name = "KEY=VALUE", value_parser = parse_env)]
        env: Vec<(String, String)>,
    },
    /// Precompile a .wasm module to native code (.cwasm), for this host or another board.
    Compile {
        /// The .wasm module.
        input: PathBuf,
        /// Where to write the .cwasm.
        #[arg(short, long)]
        output: PathBuf,
        /// Target triple, e.g. aarch64-unknown-linux-gnu or x86_64-unknown-linux-gnu. Default: this host.
        #[arg(long)]
        target: Option<String>,
    },
    /// Validate the configuration and print the effective result.
    CheckConfig,
    /// Send the running daemon's dead letters back to their sinks, once their cause is fixed.
    ///
    /// The daemon is found at the config's server.listen, with its server.token.
    Replay,
    /// Camera simulator: publish image files round-robin to an MQTT topic at a frame rate.
    ///
    /// The broker comes from --broker, else the config's [mqtt] section (with its TLS and
    /// credentials). Example: edgefn publish --topic cameras/demo/frames --fps 5 a.jpg b.jpg
    Publish {
        /// Topic to publish to, e.g. cameras/demo/frames.
        #[arg(long)]
        topic: String,
        /// Frames per second; 0 sends as fast as the broker takes them.
        #[arg(long, default_value_t = 5.0)]
        fps: f64,
        /// Frames to send; 0 sends until interrupted. Default: each image once.
        #[arg(long)]
        count: Option<u64>,
        /// Broker URL (mqtt:// or mqtts://), overriding the config.
        #[arg(long)]
        broker: Option<String>,
        /// Image files (JPEG, PNG, GIF...).
        #[arg(required = true)]
        images: Vec<PathBuf>,
    },
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| format!("`{s}` is not KEY=VALUE"))
}

fn main() -> ExitCode {
    edgefn::memory::init();
    let cli = Cli::parse();
    edgefn::logging::init();
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            // `{:#}` keeps the whole cause chain on one line.
            eprintln!("edgefn: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let source = edgefn::server::default_source(cli.config.clone());
    let load_config = || source.load();
    match cli.command {
        Command::Run => {
            let cfg = load_config()?;
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(edgefn::server::run(edgefn::server::default_source(cli.config.clone()), cfg))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Invoke { ref name, ref env } => {
            let cfg = load_config()?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(invoke(cfg, name, env))
        }
        Command::Compile { input, output, target } => {
            aot::precompile(&input, &output, target.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Publish { topic, fps, count, broker, images } => {
            let cfg = load_config()?;
            let mut mqtt = cfg.mqtt.unwrap_or_default();
            if let Some(url) = broker {
                mqtt.url = url;
            }
            let count = count.unwrap_or(images.len() as u64);
            let opts = edgefn::publish::Options { topic, fps, count, images };
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let sent = rt.block_on(edgefn::publish::run(&mqtt, opts))?;
            eprintln!("edgefn: published {sent} frames");
            Ok(ExitCode::SUCCESS)
        }
        Command::Replay => {
            let cfg = load_config()?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let answer = rt.block_on(edgefn::control::post(&cfg, "/v1/outbox/dead/replay"))?;
            eprintln!("edgefn: replayed {} dead letters", answer["replayed"]);
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig => {
            let cfg = load_config()?;
            print!("{}", cfg.to_toml());
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn invoke(cfg: Config, name: &str, env: &[(String, String)]) -> anyhow::Result<ExitCode> {
    let runtime = Runtime::load(&cfg, Arc::new(Metrics::new()), Some(name))?;
    let mut input = Vec::new();
    std::io::stdin().read_to_end(&mut input).context("reading stdin")?;
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let out = runtime.invoke(name, input.into(), &env).await?;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(&out.stdout).context("writing stdout")?;
    stdout.flush().context("writing stdout")?;
    Ok(ExitCode::SUCCESS)
}
