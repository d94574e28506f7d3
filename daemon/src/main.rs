//! The `edgefn` command: run the daemon, invoke or precompile a function, check a config.
//!
//! Every failure ends with one line on stderr naming the cause and a non-zero exit code.

use std::io::{Read, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use edgefn::cli::{ChannelArgs, Cli, Command, FleetCommand, OrderArgs};
use edgefn::config::Config;
use edgefn::fleet::channel::{Action, Order};
use edgefn::fleet::operator::{self, Broker, Plan, Transport};
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
        Command::Fleet { command } => {
            let cfg = load_config()?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(fleet_command(cfg, command))
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

/// The broker of `cfg`, or `url` instead.
fn broker(cfg: &Config, url: Option<String>) -> edgefn::config::Mqtt {
    let mut mqtt = cfg.mqtt.clone().unwrap_or_default();
    if let Some(url) = url {
        mqtt.url = url;
    }
    mqtt
}

/// The deploy message `args` describe, its image pinned by digest (a tag asked of the registry).
async fn order(cfg: &Config, args: &OrderArgs, action: Action, percent: f64) -> anyhow::Result<Order> {
    let mut image = ImageRef::parse(&args.image).map_err(anyhow::Error::msg)?;
    if image.digest().is_none() {
        let registry = fleet::registry::Registry::new(cfg);
        let (_, digest) = registry
            .manifest(&image, &[fleet::artifact::MANIFEST])
            .await?
            .with_context(|| format!("{image}: the registry has no such manifest"))?;
        image = image.with_digest(&digest);
    }
    Ok(Order {
        action,
        rollout: args.rollout.clone().unwrap_or_else(|| format!("{}-{}", args.function, operator::next_seq())),
        function: args.function.clone(),
        image: image.to_string(),
        selector: args.selector.iter().cloned().collect(),
        percent,
        seq: operator::next_seq(),
        expires: operator::expires_in(args.expires),
    })
}

async fn transport(
    cfg: &Config,
    to: &ChannelArgs,
    events: Option<String>,
) -> anyhow::Result<(Transport, Option<Broker>)> {
    let mqtt = broker(cfg, to.broker.clone());
    match &to.dapr {
        Some(url) => {
            let watching = match events {
                Some(e) => Some(Broker::connect(&mqtt, Some(e)).await?),
                None => None,
            };
            let t = Transport::Dapr { url: url.clone(), pubsub: to.pubsub.clone(), topic: to.topic.clone() };
            Ok((t, watching))
        }
        None => {
            let t = Transport::Mqtt { broker: Box::new(Broker::connect(&mqtt, None).await?), topic: to.topic.clone() };
            let watching = match events {
                Some(e) => Some(Broker::connect(&mqtt, Some(e)).await?),
                None => None,
            };
            Ok((t, watching))
        }
    }
}

async fn fleet_command(cfg: Config, command: FleetCommand) -> anyhow::Result<ExitCode> {
    match command {
        FleetCommand::Message { order: args, percent, rollback } => {
            let action = if rollback { Action::Rollback } else { Action::Deploy };
            let o = order(&cfg, &args, action, percent).await?;
            std::io::stdout().write_all(&operator::message(&o))?;
            Ok(ExitCode::SUCCESS)
        }
        FleetCommand::Publish { message, key, signature, to } => {
            let bytes = std::fs::read(&message).with_context(|| format!("reading {}", message.display()))?;
            let o: Order = serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not a deploy message", message.display()))?;
            let envelope = match (key, signature) {
                (Some(k), _) => operator::seal(&bytes, &fleet::signer::Signer::load(&k)?),
                (None, Some(s)) => {
                    let sig = std::fs::read_to_string(&s).with_context(|| format!("reading {}", s.display()))?;
                    serde_json::to_vec(&fleet::channel::Signed::new(&bytes, &sig))?
                }
                (None, None) => anyhow::bail!("sign with --key, or give --signature"),
            };
            let (mut t, _) = transport(&cfg, &to, None).await?;
            t.send(&envelope).await?;
            eprintln!("edgefn: published {:?} of rollout {} (seq {})", o.action, o.rollout, o.seq);
            if let Transport::Mqtt { broker, .. } = t {
                broker.close().await;
            }
            Ok(ExitCode::SUCCESS)
        }
        FleetCommand::Rollout { order: args, key, waves, max_failed, settle, wave_timeout, events, to } => {
            anyhow::ensure!(
                !waves.is_empty()
                    && waves.windows(2).all(|w| w[0] < w[1])
                    && waves.iter().all(|w| (0.0..=100.0).contains(w)),
                "--waves must rise, each 0 to 100"
            );
            let signer = fleet::signer::Signer::load(&key)?;
            let o = order(&cfg, &args, Action::Deploy, 0.0).await?;
            let plan = Plan {
                function: o.function,
                image: o.image,
                rollout: o.rollout,
                selector: o.selector,
                waves,
                max_failed,
                settle,
                wave_timeout,
                valid: args.expires,
            };
            let (mut t, watching) = transport(&cfg, &to, Some(events)).await?;
            let mut watching = watching.expect("events are watched");
            eprintln!("edgefn: rollout {} of {} to {}", plan.rollout, plan.function, plan.image);
            let out = operator::roll_out(&plan, &signer, &mut t, &mut watching).await?;
            println!(
                "{}",
                serde_json::json!({ "rollout": plan.rollout, "boards": out.boards, "stopped_at": out.stopped_at })
            );
            watching.close().await;
            if let Transport::Mqtt { broker, .. } = t {
                broker.close().await;
            }
            Ok(if out.stopped_at.is_some() { ExitCode::from(3) } else { ExitCode::SUCCESS })
        }
        FleetCommand::Watch { events, broker: url } => {
            let mut b = Broker::connect(&broker(&cfg, url), Some(events)).await?;
            loop {
                if let Some(d) = b.next_event(Duration::from_secs(3600)).await {
                    println!("{}", serde_json::to_string(&d)?);
                }
            }
        }
    }
}
