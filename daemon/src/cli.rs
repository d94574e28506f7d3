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
