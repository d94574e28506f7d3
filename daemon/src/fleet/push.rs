//! The operator's commands against a registry: `edgefn push` (a module as a wasm artifact) and
//! `edgefn sign` (a cosign signature beside it, at `sha256-<hex>.sig`).

use std::path::Path;

use anyhow::Context;
use serde_json::json;

use super::artifact::{self, Layout};
use super::reference::ImageRef;
use super::registry::Registry;
use super::signer::Signer;
use super::trust;

/// Pushes `module` as a CNCF wasm artifact at `image`; returns the manifest's digest.
pub async fn push(registry: &Registry, module: &Path, image: &ImageRef) -> anyhow::Result<String> {
    let bytes = std::fs::read(module).with_context(|| format!("reading {}", module.display()))?;
    Layout::check_module(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", module.display()))?;
    let title = module.file_name().and_then(|n| n.to_str()).unwrap_or("module.wasm");
    let (manifest, config) = Layout::build(&bytes, title);
    registry.push_blob(image, &bytes).await?;
    registry.push_blob(image, &config).await?;
    registry.push_manifest(image, &manifest).await
}

/// Signs the manifest `image` names, as `cosign sign --key` does (legacy tag scheme, no
/// transparency log), keeping any signatures already there. Returns the signed digest.
pub async fn sign(registry: &Registry, signer: &Signer, image: &ImageRef) -> anyhow::Result<String> {
    let (_, digest) = registry
        .manifest(image, &[artifact::MANIFEST])
        .await?
        .with_context(|| format!("{image}: the registry has no such manifest"))?;
    let payload = trust::payload(&image.name(), &digest);
    let signature = signer.sign(&payload);
    let at = image.with_tag(&trust::signature_tag(&digest));

    let mut layers: Vec<serde_json::Value> = match registry.manifest(&at, &[artifact::MANIFEST]).await? {
        Some((bytes, _)) => {
            serde_json::from_slice::<serde_json::Value>(&bytes)?["layers"].as_array().cloned().unwrap_or_default()
        }
        None => Vec::new(),
    };
    let payload_digest = registry.push_blob(&at, &payload).await?;
    layers.push(json!({
        "mediaType": trust::SIGNATURE_LAYER,
        "size": payload.len(),
        "digest": payload_digest,
        "annotations": { trust::SIGNATURE_ANNOTATION: signature },
    }));
    let diff_ids: Vec<_> = layers.iter().map(|l| l["digest"].clone()).collect();
    let config = serde_json::to_vec(&json!({
        "architecture": "",
        "created": "0001-01-01T00:00:00Z",
        "history": [{ "created": "0001-01-01T00:00:00Z" }],
        "os": "",
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
        "config": {},
    }))?;
    registry.push_blob(&at, &config).await?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": artifact::MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "size": config.len(),
            "digest": artifact::digest(&config),
        },
        "layers": layers,
    }))?;
    registry.push_manifest(&at, &manifest).await?;
    Ok(digest)
}
