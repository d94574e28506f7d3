//! The `edgefn` command: run the daemon, invoke or precompile a function, check a config.
//!
//! Every failure ends with one line on stderr naming the cause and a non-zero exit code.

use std::io::{Read, Write};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use edgefn::cli::{Cli, Command};
use edgefn::config::Config;
use edgefn::metrics::Metrics;
use edgefn::runtime::{Runtime, aot};

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
