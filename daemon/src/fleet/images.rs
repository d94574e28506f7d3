//! Function versions from registries: pulled, verified and stored, or found in the store.
//!
//! A pull fetches the manifest, judges its layout, checks its signature (before the module is
//! downloaded, so an untrusted artifact costs a few kilobytes), then fetches the config and
//! the module, each capped and hashed, and records what the reference resolved to. Only then
//! is a version usable. A cached version is checked again, against its digests and against
//! the trust keys of the day, every time it is used: a key removed from `[trust]` stops its
//! artifacts at the next start even offline.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use super::artifact::{self, Layout};
use super::blobs::{Blobs, Resolved};
use super::reference::ImageRef;
use super::registry::Registry;
use super::rollout::Records;
use super::trust::{self, SignedPayload, Trust};
use crate::config::Config;
use crate::runtime::Fetched;

/// Fetches the image of every configured function that has one (with `only`, of that one),
/// the store first, each at its `committed` version if it has one: what the runtime loads
/// them from. A failure is that function's alone.
pub async fn fetch_configured(cfg: &Config, only: Option<&str>, committed: &Records) -> Fetched {
    let wanted: Vec<(&String, &String)> = cfg
        .functions
        .iter()
        .filter(|(name, _)| only.is_none_or(|o| o == name.as_str()))
        .filter_map(|(name, f)| Some((name, f.image.as_ref()?)))
        .collect();
    let mut fetched = Fetched::new();
    if wanted.is_empty() {
        return fetched;
    }
    let images = match Images::new(cfg) {
        Ok(i) => i,
        Err(e) => {
            tracing::error!("no function from a registry loads: {e:#}");
            return wanted.into_iter().map(|(name, _)| (name.clone(), Err(format!("{e:#}")))).collect();
        }
    };
    if images.trust.is_empty() {
        tracing::warn!("functions from registries load unverified: [trust] keys is empty");
    }
    for (name, text) in wanted {
        let result = match super::rollout::start_reference(committed, name, text) {
            Ok(image) => images.fetch(&image).await.map_err(|e| format!("{e:#}")),
            Err(e) => Err(e),
        };
        match &result {
            Ok(p) => tracing::info!(
                function = %name, image = %p.image, digest = %p.manifest,
                signed_by = p.signed_by.as_deref().unwrap_or("nobody (no [trust] keys)"), "image ready"
            ),
            Err(e) => tracing::error!(function = %name, "image not usable: {e}"),
        }
        fetched.insert(name.clone(), result.map(|p| p.module));
    }
    fetched
}

/// A signature manifest may carry this many layers; more are not read.
const MAX_SIGNATURES: usize = 32;

/// A version ready to load: its manifest digest and the module file in the store.
#[derive(Debug, Clone)]
pub struct Pulled {
    pub image: String,
    pub manifest: String,
    pub module: PathBuf,
    /// The trust key that signed it; None when `[trust] keys` is empty.
    pub signed_by: Option<String>,
}

pub struct Images {
    registry: Registry,
    blobs: Blobs,
    trust: Trust,
    max_module: u64,
    pull_timeout: Duration,
}

impl Images {
    pub fn new(cfg: &Config) -> anyhow::Result<Images> {
        Ok(Images {
            registry: Registry::new(cfg),
            blobs: Blobs::open(&cfg.runtime.state_dir),
            trust: Trust::load(&cfg.trust)?,
            max_module: cfg.fleet.max_module.as_u64(),
            pull_timeout: cfg.fleet.pull_timeout,
        })
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The stored version of `image`, else a pull: what a start does. A board offline with
    /// the version stored never waits on the registry.
    pub async fn fetch(&self, image: &ImageRef) -> anyhow::Result<Pulled> {
        match self.cached(image) {
            Ok(Some(p)) => return Ok(p),
            Ok(None) => {}
            Err(e) => tracing::warn!(image = %image, "stored version not usable, pulling again: {e:#}"),
        }
        self.pull(image).await
    }

    /// The stored version of `image`, checked again; None if it was never pulled.
    pub fn cached(&self, image: &ImageRef) -> anyhow::Result<Option<Pulled>> {
        let Some(resolved) = self.blobs.resolved(&image.to_string()) else {
            return Ok(None);
        };
        let manifest = self.blobs.get(&resolved.manifest)?;
        let layout = Layout::check(&manifest, self.max_module).map_err(|e| anyhow::anyhow!("{image}: {e}"))?;
        let signed_by = if self.trust.is_empty() {
            None
        } else {
            let payloads = resolved
                .signatures
                .iter()
                .map(|(digest, signature)| {
                    Ok(SignedPayload { payload: self.blobs.get(digest)?, signature: signature.clone() })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let key =
                self.trust.verify_image(&resolved.manifest, &payloads).map_err(|e| anyhow::anyhow!("{image}: {e}"))?;
            Some(key.to_string())
        };
        let module = self.blobs.checked_path(&layout.module.digest)?;
        Layout::check_module(&std::fs::read(&module)?).map_err(|e| anyhow::anyhow!("{image}: {e}"))?;
        Ok(Some(Pulled { image: image.to_string(), manifest: resolved.manifest, module, signed_by }))
    }

    /// Pulls `image`, verifies it and stores it, within `fleet.pull_timeout`.
    pub async fn pull(&self, image: &ImageRef) -> anyhow::Result<Pulled> {
        tokio::time::timeout(self.pull_timeout, self.pull_now(image)).await.unwrap_or_else(|_| {
            anyhow::bail!("{image}: the pull did not finish within fleet.pull_timeout ({:?})", self.pull_timeout)
        })
    }

    async fn pull_now(&self, image: &ImageRef) -> anyhow::Result<Pulled> {
        let (manifest, digest) = self
            .registry
            .manifest(image, &[artifact::MANIFEST])
            .await?
            .with_context(|| format!("{image}: the registry has no such manifest"))?;
        let layout = Layout::check(&manifest, self.max_module).map_err(|e| anyhow::anyhow!("{image}: {e}"))?;
        let (signed_by, signatures) = self.check_signatures(image, &digest).await?;

        let config = self.registry.blob(image, &layout.config, artifact::MAX_METADATA).await?;
        layout.check_config(&config).map_err(|e| anyhow::anyhow!("{image}: {e}"))?;
        if self.blobs.get(&layout.module.digest).is_err() {
            let module = self.registry.blob(image, &layout.module, self.max_module).await?;
            Layout::check_module(&module).map_err(|e| anyhow::anyhow!("{image}: {e}"))?;
            self.blobs.put(&layout.module.digest, &module)?;
        }
        self.blobs.put(&layout.config.digest, &config)?;
        self.blobs.put(&digest, &manifest)?;
        let resolved = Resolved { manifest: digest.clone(), module: layout.module.digest.clone(), signatures };
        self.blobs.record(&image.to_string(), resolved.clone())?;
        // A pinned reference is now stored under both names.
        if image.digest().is_none() {
            self.blobs.record(&image.with_digest(&digest).to_string(), resolved)?;
        }
        let module = self.blobs.checked_path(&layout.module.digest)?;
        Ok(Pulled { image: image.to_string(), manifest: digest, module, signed_by })
    }

    /// The trusted key that signed `digest`, with the payloads to store; without keys, none.
    async fn check_signatures(
        &self,
        image: &ImageRef,
        digest: &str,
    ) -> anyhow::Result<(Option<String>, Vec<(String, String)>)> {
        if self.trust.is_empty() {
            return Ok((None, Vec::new()));
        }
        let at = image.with_tag(&trust::signature_tag(digest));
        let layers = match self.registry.manifest(&at, &SIGNATURE_MANIFESTS).await? {
            None => Vec::new(),
            Some((bytes, _)) => trust::signature_layers(&bytes),
        };
        let mut payloads = Vec::new();
        for (d, signature) in layers.iter().take(MAX_SIGNATURES) {
            let payload = self.registry.blob(&at, d, artifact::MAX_METADATA).await?;
            payloads.push(SignedPayload { payload, signature: signature.clone() });
        }
        let key = self
            .trust
            .verify_image(digest, &payloads)
            .map_err(|e| anyhow::anyhow!("{image}: refused: {e}"))?
            .to_string();
        let mut stored = Vec::new();
        for ((d, signature), p) in layers.iter().zip(&payloads) {
            self.blobs.put(&d.digest, &p.payload)?;
            stored.push((d.digest.clone(), signature.clone()));
        }
        Ok((Some(key), stored))
    }
}

/// cosign writes OCI manifests; older versions wrote Docker's.
const SIGNATURE_MANIFESTS: [&str; 2] = [artifact::MANIFEST, "application/vnd.docker.distribution.manifest.v2+json"];
