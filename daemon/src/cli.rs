//! The `edgefn` command line: its subcommands and options, in the library so that the man page
//! and the shell completion (`examples/docs.rs`, run by the packaging) come from the same
//! definition as the binary's `--help`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Runs ahead-of-time compiled WebAssembly functions on camera frames.
///
/// Functions are WASI command modules: the frame on stdin, the result on stdout. Each call runs
/// in a fresh sandbox with memory, time and output limits, and sees nothing of the host that
/// its config does not grant.
#[derive(Parser)]
#[command(name = "edgefn", version, propagate_version = true)]
pub struct Cli {
    /// Configuration file (TOML). Environment variables EDGEFN__SECTION__KEY override it.
    #[arg(long, short, global = true, env = "EDGEFN_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
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
    /// Push a .wasm module to a registry as a CNCF wasm artifact; prints REF@DIGEST.
    ///
    /// Credentials and TLS for the registry come from the config's [registries]. The same file
    /// pushed twice has the same digest. Example: edgefn push grayscale.wasm oci://registry.example.org/edge/grayscale:v2
    Push {
        /// The .wasm module (a WASI preview 1 command).
        module: PathBuf,
        /// oci://HOST[:PORT]/REPO:TAG
        image: String,
    },
    /// Pull a function version into the board's store ahead of time, verified under [trust].
    ///
    /// The daemon then starts from the store without asking the registry, for example on a
    /// board that boots offline.
    Pull {
        /// oci://HOST[:PORT]/REPO:TAG or ...@sha256:DIGEST
        image: String,
    },
    /// Sign a pushed version with a P-256 key, as `cosign sign --key` does (tag sha256-<hex>.sig).
    ///
    /// KEY is cosign's cosign.key (its password in COSIGN_PASSWORD) or a PKCS#8 or SEC1 PEM.
    /// `cosign verify --key cosign.pub --insecure-ignore-tlog` accepts the result.
    Sign {
        /// oci://HOST[:PORT]/REPO:TAG or ...@sha256:DIGEST
        image: String,
        /// The private key.
        #[arg(long)]
        key: PathBuf,
    },
    /// Deploy a new version of a function from a registry to the running daemon, on trial.
    ///
    /// The daemon pulls, verifies and compiles it, switches it in, and commits it once it
    /// passes its gate ([fleet] gate_*), or rolls back to the version before by itself. The
    /// daemon is found at the config's server.listen, with its server.token.
    Deploy {
        /// The function, as configured with [functions.NAME] image.
        name: String,
        /// oci://HOST[:PORT]/REPO:TAG or ...@sha256:DIGEST
        image: String,
    },
    /// The fleet's operator: signed deploy messages to many boards, in waves.
    ///
    /// Boards take them from their [fleet] channel (an MQTT topic, or a Dapr subscription) and
    /// check them against their [trust] keys. The broker comes from --broker, else the
    /// config's [mqtt] section.
    Fleet {
        #[command(subcommand)]
        command: FleetCommand,
    },
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

#[derive(Subcommand)]
pub enum FleetCommand {
    /// Print a deploy message (the exact bytes to sign, e.g. with `cosign sign-blob --key`).
    Message {
        #[command(flatten)]
        order: OrderArgs,
        /// Percentage of the selected boards, 0 to 100.
        #[arg(long, default_value_t = 100.0)]
        percent: f64,
        /// Order the boards that took the rollout back to the version before it.
        #[arg(long)]
        rollback: bool,
    },
    /// Publish a deploy message, signed with --key or with a signature made elsewhere.
    Publish {
        /// The message file (as `edgefn fleet message` prints it).
        message: PathBuf,
        /// A P-256 private key (cosign.key, with COSIGN_PASSWORD, or PKCS#8 / SEC1 PEM).
        #[arg(long, conflicts_with = "signature", required_unless_present = "signature")]
        key: Option<PathBuf>,
        /// A base64 signature over the file, e.g. `cosign sign-blob --key cosign.key FILE`'s.
        #[arg(long)]
        signature: Option<PathBuf>,
        #[command(flatten)]
        to: ChannelArgs,
    },
    /// Roll a version out wave by wave, watching the boards' deployment events; stop and
    /// order a rollback when too many of a wave's boards fail. Exits 3 when stopped.
    Rollout {
        #[command(flatten)]
        order: OrderArgs,
        /// The signing key.
        #[arg(long)]
        key: PathBuf,
        /// Wave percentages, rising.
        #[arg(long, value_delimiter = ',', default_value = "10,50,100")]
        waves: Vec<f64>,
        /// Stop when more than this percentage of a wave's boards fail.
        #[arg(long, default_value_t = 20.0)]
        max_failed: f64,
        /// A wave is done when no board is on trial and none has reported for this long.
        #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
        settle: std::time::Duration,
        /// A wave is judged after this long whatever has been reported.
        #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
        wave_timeout: std::time::Duration,
        /// The topic (filter) where boards send deployment events ([fleet] events).
        #[arg(long, default_value = "edgefn/fleet/events")]
        events: String,
        #[command(flatten)]
        to: ChannelArgs,
    },
    /// Print the boards' deployment events, one line each, until interrupted.
    Watch {
        #[arg(long, default_value = "edgefn/fleet/events")]
        events: String,
        /// Broker URL (mqtt:// or mqtts://), overriding the config.
        #[arg(long)]
        broker: Option<String>,
    },
}

/// What a deploy message says.
#[derive(clap::Args)]
pub struct OrderArgs {
    /// The function, as boards configure it ([functions.NAME] image).
    pub function: String,
    /// oci://HOST[:PORT]/REPO@sha256:DIGEST (a tag is resolved to its digest first).
    pub image: String,
    /// The rollout's id. Default: FUNCTION-<time>.
    #[arg(long)]
    pub rollout: Option<String>,
    /// Only boards with this label (repeatable), as [board] labels sets them.
    #[arg(long = "selector", value_name = "KEY=VALUE", value_parser = parse_env)]
    pub selector: Vec<(String, String)>,
    /// How long the message stays valid.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub expires: std::time::Duration,
}

/// Where deploy messages go: an MQTT topic, or a Dapr pub/sub topic through daprd.
#[derive(clap::Args)]
pub struct ChannelArgs {
    /// Broker URL (mqtt:// or mqtts://), overriding the config.
    #[arg(long)]
    pub broker: Option<String>,
    /// The topic boards take deploy messages from ([fleet] channel).
    #[arg(long, default_value = "edgefn/fleet/deploy")]
    pub topic: String,
    /// Publish through this daprd (e.g. http://127.0.0.1:3500) instead of MQTT.
    #[arg(long)]
    pub dapr: Option<String>,
    /// The Dapr pub/sub component, with --dapr.
    #[arg(long, default_value = "pubsub")]
    pub pubsub: String,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| format!("`{s}` is not KEY=VALUE"))
}
