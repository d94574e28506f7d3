//! edgefn runs sandboxed WebAssembly functions on camera frames at the edge.
//!
//! The major components, in the order a frame meets them:
//!
//! - [`ingress`]: where frames come in: [`ingress::mqtt`] (cameras), [`ingress::http`] (the
//!   API and the web page), [`ingress::dapr`] (events from a Dapr sidecar).
//! - [`pipeline`]: a chain of functions per frame, per-camera queues with backpressure, and the
//!   acknowledgement a frame owes its source.
//! - [`runtime`]: the wasm functions. Each is compiled ahead of time ([`runtime::aot`]), and
//!   each call gets a fresh sandboxed instance with memory, time and output limits.
//! - [`sinks`]: the durable [`sinks::outbox`] and the delivery workers that drain it to Dapr,
//!   MQTT or files.
//! - [`server`]: `edgefn run`: builds the components, reloads on SIGHUP, shuts down in order;
//!   [`systemd`] tells systemd about it.
//! - Shared: [`board`] (this board's identity in result ids), [`cli`] (the command line),
//!   [`config`], [`metrics`], [`logging`], [`memory`] (the
//!   allocator), [`mqtt`] (the broker connection), [`content_type`]; [`publish`], the camera
//!   simulator; and [`control`], subcommands that act on a running daemon.
//!
//! - [`fleet`]: function versions as signed OCI artifacts: pulled from any registry, checked
//!   against cosign signatures, stored by digest for an offline start, switched in on trial
//!   and committed or rolled back by a gate; signed deploy messages from the fleet channel, in
//!   waves; `deployment` events; `edgefn push`, `pull`, `sign`, `deploy` and `fleet`.
//!
//! Imports point one way: ingress → pipeline → runtime; pipeline → sinks; fleet → runtime.

pub mod board;
pub mod cli;
pub mod config;
pub mod content_type;
pub mod control;
pub mod fleet;
pub mod ingress;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod mqtt;
pub mod pipeline;
pub mod publish;
pub mod runtime;
pub mod server;
pub mod sinks;
pub mod systemd;
