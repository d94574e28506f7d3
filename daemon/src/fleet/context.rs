//! What every way a version arrives (`edgefn deploy`, a tag poll, the fleet channel) works
//! with: one generation's config and runtime, the board's identity, where events go, and the
//! signal that the generation is closing.

use std::sync::Arc;

use tokio::sync::watch;

use super::events::{Deployment, Reporter};
use super::rollout::Version;
use crate::config::Config;
use crate::runtime::Runtime;

pub struct Context {
    pub cfg: Arc<Config>,
    pub runtime: Arc<Runtime>,
    /// This board's id ([`crate::board::id`]).
    pub board: String,
    pub events: Reporter,
    /// Turns true when the generation stops (a reload or SIGTERM): gates end unjudged.
    pub closing: watch::Receiver<bool>,
}

impl Context {
    pub fn new(cfg: Arc<Config>, runtime: Arc<Runtime>, events: Reporter, closing: watch::Receiver<bool>) -> Arc<Self> {
        let board = crate::board::id(&cfg.board);
        Arc::new(Context { cfg, runtime, board, events, closing })
    }

    /// Sends one step upstream.
    pub fn report(&self, step: Step<'_>) {
        (self.events)(Deployment {
            board: self.board.clone(),
            labels: self.cfg.board.labels.clone(),
            function: step.function.to_string(),
            rollout: step.rollout.map(str::to_string),
            image: step.version.image.clone(),
            digest: step.version.digest.clone(),
            outcome: step.outcome.to_string(),
            reason: step.reason,
            previous: step.previous.map(|p| p.digest.clone()),
        });
    }
}

/// One step of a rollout, as [`Context::report`] sends it.
pub struct Step<'a> {
    pub function: &'a str,
    pub rollout: Option<&'a str>,
    pub version: &'a Version,
    pub outcome: &'a str,
    pub reason: Option<String>,
    pub previous: Option<&'a Version>,
}
