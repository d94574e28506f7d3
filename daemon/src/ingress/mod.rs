//! Ingress: where frames enter the daemon. Each ingress hands bytes to the runtime and
//! answers its caller; none of them knows how functions run.

pub mod dapr;
mod deploy;
pub mod handoff;
pub mod http;
pub mod listener;
pub mod mqtt;
pub mod notice;
pub mod openapi;
pub mod origin;
pub mod routes;
pub mod status;
pub mod web;
