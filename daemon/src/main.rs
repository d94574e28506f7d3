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
use edgefn::fleet::{self, ImageRef};
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
        Command::Push { module, image } => {
            let cfg = load_config()?;
            let image = ImageRef::parse(&image).map_err(anyhow::Error::msg)?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let digest = rt.block_on(fleet::push::push(&fleet::registry::Registry::new(&cfg), &module, &image))?;
            println!("{}", image.with_digest(&digest));
            Ok(ExitCode::SUCCESS)
        }
        Command::Pull { image } => {
            let cfg = load_config()?;
            let image = ImageRef::parse(&image).map_err(anyhow::Error::msg)?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let pulled = rt.block_on(async { fleet::Images::new(&cfg)?.pull(&image).await })?;
            match &pulled.signed_by {
                Some(key) => eprintln!("edgefn: pulled {image} ({}), signed by {key}", pulled.manifest),
                None => eprintln!("edgefn: pulled {image} ({}); not checked: [trust] has no keys", pulled.manifest),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Sign { image, key } => {
            let cfg = load_config()?;
            let image = ImageRef::parse(&image).map_err(anyhow::Error::msg)?;
            let signer = fleet::signer::Signer::load(&key)?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let digest = rt.block_on(fleet::push::sign(&fleet::registry::Registry::new(&cfg), &signer, &image))?;
            eprintln!("edgefn: signed {}", image.with_digest(&digest));
            Ok(ExitCode::SUCCESS)
        }
        Command::Deploy { name, image } => {
            let cfg = load_config()?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let body = serde_json::to_vec(&serde_json::json!({ "image": image }))?;
            let answer =
                rt.block_on(edgefn::control::post_json(&cfg, &format!("/v1/functions/{name}/deploy"), body.into()))?;
            eprintln!(
                "edgefn: {name}: {} {} ({})",
                answer["image"].as_str().unwrap_or(""),
                answer["state"].as_str().unwrap_or(""),
                answer["digest"].as_str().unwrap_or("")
            );
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
    let committed = fleet::rollout::Board::open(&cfg.runtime.state_dir).committed();
    let fetched = fleet::images::fetch_configured(&cfg, Some(name), &committed).await;
    let runtime = Runtime::load(&cfg, Arc::new(Metrics::new()), Some(name), &fetched)?;
    let mut input = Vec::new();
    std::io::stdin().read_to_end(&mut input).context("reading stdin")?;
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let out = runtime.invoke(name, input.into(), &env).await?;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(&out.stdout).context("writing stdout")?;
    stdout.flush().context("writing stdout")?;
    Ok(ExitCode::SUCCESS)
}
