//! Tag polling (`[fleet] poll`): every interval, ask the registry what each function's tag
//! points at, and deploy a new digest on trial. A digest rolled back on this board is not
//! tried again (only `edgefn deploy` does that), and a registry that cannot be reached is
//! only logged: the board goes on serving what it has.

use std::sync::Arc;

use super::Context;
use super::artifact;
use super::reference::ImageRef;
use super::registry::Registry;
use super::rollout::{self, Board, Origin};

/// Polls until the generation closes.
pub async fn run(ctx: Arc<Context>) {
    let Some(every) = ctx.cfg.fleet.poll else { return };
    let tagged: Vec<(String, ImageRef)> = ctx
        .cfg
        .functions
        .iter()
        .filter_map(|(name, f)| Some((name.clone(), ImageRef::parse(f.image.as_ref()?).ok()?)))
        .filter(|(_, image)| image.digest().is_none())
        .collect();
    if tagged.is_empty() {
        return;
    }
    let registry = Registry::new(&ctx.cfg);
    let mut closing = ctx.closing.clone();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = closing.wait_for(|c| *c) => return,
        }
        for (name, image) in &tagged {
            let digest = match registry.manifest(image, &[artifact::MANIFEST]).await {
                Ok(Some((_, digest))) => digest,
                Ok(None) => {
                    tracing::warn!(function = %name, image = %image, "tag poll: the registry has no such tag");
                    continue;
                }
                Err(e) => {
                    tracing::debug!(function = %name, image = %image, "tag poll: {e:#}");
                    continue;
                }
            };
            let record = Board::open(&ctx.cfg.runtime.state_dir).read().remove(name).unwrap_or_default();
            let known = [&record.trial, &record.committed].into_iter().flatten().any(|v| v.digest == digest)
                || record.rolled_back.contains(&digest)
                || (record.committed.is_none() && served_at_start(&ctx, name, &digest));
            if known {
                continue;
            }
            tracing::info!(function = %name, image = %image, digest = %digest, "tag poll: a new version");
            let pinned = image.with_digest(&digest).to_string();
            if let Err(e) = rollout::deploy(&ctx, name, &pinned, Origin::Poll).await {
                tracing::warn!(function = %name, image = %pinned, "tag poll: not deployed: {e:#}");
            }
        }
    }
}

/// The digest the configured tag resolved to when the function loaded (no rollout since).
fn served_at_start(ctx: &Context, name: &str, digest: &str) -> bool {
    let image = ctx.cfg.functions.get(name).and_then(|f| f.image.as_deref()).unwrap_or_default();
    super::blobs::Blobs::open(&ctx.cfg.runtime.state_dir).resolved(image).is_some_and(|r| r.manifest == digest)
}
