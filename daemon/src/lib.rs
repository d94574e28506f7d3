//! edgefn runs sandboxed WebAssembly functions on camera frames at the edge.
//!
//! The major components, in the order a frame meets them:
//!
//! - [`ingress`]: where frames come in. [`ingress::http`] serves the HTTP API.
//! - [`runtime`]: the wasm functions. Each is compiled ahead of time ([`runtime::aot`]), and
//!   each call gets a fresh sandboxed instance with memory, time and output limits.
//! - [`metrics`]: counters and histograms for `/metrics`.
//! - [`config`]: the TOML configuration and its environment overrides.
//! - [`logging`]: journald under systemd, readable stderr otherwise.
//! - [`server`]: `edgefn run`: builds the components, reloads on SIGHUP, shuts down in order.
//! - [`systemd`]: readiness, status and watchdog notifications.
//!
//! Imports point one way: ingress → runtime. The runtime knows nothing of HTTP.

pub mod config;
pub mod content_type;
pub mod ingress;
pub mod logging;
pub mod metrics;
pub mod mqtt;
pub mod pipeline;
pub mod publish;
pub mod runtime;
pub mod server;
pub mod sinks;
pub mod systemd;
