//! Logging: structured fields to journald when systemd runs us, readable lines on stderr otherwise.
//!
//! systemd sets `JOURNAL_STREAM` when stdout/stderr go to the journal; writing to the journal's
//! socket directly keeps the fields (function, camera, ...) as journal fields. `RUST_LOG` filters.

use std::io::IsTerminal;
use std::path::Path;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    if std::env::var_os("JOURNAL_STREAM").is_some() && Path::new(JOURNAL_SOCKET).exists() {
        match tracing_journald::layer() {
            Ok(journald) => {
                registry.with(journald.with_syslog_identifier("edgefn".into())).init();
                return;
            }
            Err(e) => eprintln!("edgefn: journald unavailable ({e}); logging to stderr"),
        }
    }
    registry
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal()))
        .init();
}
