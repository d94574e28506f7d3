//! The board's store of pulled artifacts: blobs by digest under the state dir, and which
//! manifest each image reference last resolved to.
//!
//! Every read checks the bytes against their digest, so a blob damaged on the SD card is
//! refused (and removed, to be pulled again) rather than run. A board that boots offline
//! serves from here and never waits on a registry.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::artifact::digest;

/// What one image reference resolved to when it was last pulled and verified.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resolved {
    /// The manifest's digest.
    pub manifest: String,
    /// The module layer's digest.
    pub module: String,
    /// Digests of the signature payloads kept with their base64 signatures, so that a cached
    /// artifact is checked again under the keys of the day.
    #[serde(default)]
    pub signatures: Vec<(String, String)>,
}

pub struct Blobs {
    root: PathBuf,
}

impl Blobs {
    pub fn open(state_dir: &Path) -> Blobs {
        Blobs { root: state_dir.join("fleet") }
    }

    fn path(&self, digest: &str) -> anyhow::Result<PathBuf> {
        anyhow::ensure!(super::reference::is_sha256(digest), "`{digest}` is not a sha256 digest");
        Ok(self.root.join("blobs/sha256").join(&digest["sha256:".len()..]))
    }

    /// The file holding `digest`, after checking its bytes; a damaged one is removed.
    pub fn checked_path(&self, digest: &str) -> anyhow::Result<PathBuf> {
        self.get(digest)?;
        self.path(digest)
    }

    pub fn has(&self, digest: &str) -> bool {
        self.path(digest).is_ok_and(|p| p.is_file())
    }

    /// The bytes of `digest`, checked.
    pub fn get(&self, digest: &str) -> anyhow::Result<Vec<u8>> {
        let path = self.path(digest)?;
        let bytes = std::fs::read(&path).with_context(|| format!("{digest} is not in the artifact cache"))?;
        let actual = super::artifact::digest(&bytes);
        if actual != digest {
            let _ = std::fs::remove_file(&path);
            anyhow::bail!(
                "the cached blob {digest} is damaged (its bytes hash to {actual}); removed, to be pulled again"
            );
        }
        Ok(bytes)
    }

    /// Stores `bytes`, which must hash to `expected`; durable before this returns.
    pub fn put(&self, expected: &str, bytes: &[u8]) -> anyhow::Result<()> {
        let actual = digest(bytes);
        anyhow::ensure!(actual == expected, "the bytes hash to {actual}, not {expected}");
        let path = self.path(expected)?;
        if path.is_file() {
            return Ok(());
        }
        write_durably(&path, bytes)
    }

    /// What `image` resolved to at its last verified pull.
    pub fn resolved(&self, image: &str) -> Option<Resolved> {
        self.index().remove(image)
    }

    pub fn record(&self, image: &str, resolved: Resolved) -> anyhow::Result<()> {
        let mut index = self.index();
        index.insert(image.to_string(), resolved);
        write_durably(&self.root.join("refs.json"), &serde_json::to_vec_pretty(&index)?)
    }

    fn index(&self) -> BTreeMap<String, Resolved> {
        std::fs::read(self.root.join("refs.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }
}

/// Bytes reach the disk under a temporary name before they take the final one.
pub(crate) fn write_durably(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().expect("a blob path has a parent");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    static WRITERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let writer = WRITERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp{}.{writer}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("syncing {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_damaged_blob_is_refused_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Blobs::open(dir.path());
        let d = digest(b"module");
        assert!(blobs.put(&d, b"other").is_err());
        blobs.put(&d, b"module").unwrap();
        assert_eq!(blobs.get(&d).unwrap(), b"module");
        std::fs::write(blobs.path(&d).unwrap(), b"modulf").unwrap();
        assert!(format!("{:#}", blobs.get(&d).unwrap_err()).contains("damaged"));
        assert!(!blobs.has(&d));
    }
}
