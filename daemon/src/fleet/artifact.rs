//! A function as an OCI artifact, in the CNCF wasm layout: an image manifest whose config is
//! `application/vnd.wasm.config.v0+json` and whose only layer is the `application/wasm` module.
//!
//! [`Layout::check`] is the one place a pulled manifest and config are judged: anything else
//! (another media type, two layers, a config that names other layers) is refused with a
//! sentence, before the module is downloaded. [`Layout::build`] writes the same layout for
//! `edgefn push`, byte for byte reproducibly, so one file pushed twice has one digest.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const CONFIG: &str = "application/vnd.wasm.config.v0+json";
pub const MODULE: &str = "application/wasm";
/// Manifests and configs are small; a larger one is refused rather than parsed.
pub const MAX_METADATA: u64 = 64 << 10;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<serde_json::Map<String, serde_json::Value>>,
}

impl Descriptor {
    pub fn of(media_type: &str, bytes: &[u8]) -> Descriptor {
        Descriptor { media_type: media_type.into(), digest: digest(bytes), size: bytes.len() as u64, annotations: None }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default)]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WasmConfig {
    created: String,
    architecture: String,
    os: String,
    layer_digests: Vec<String>,
}

/// The checked layout of one function version.
#[derive(Debug, Clone)]
pub struct Layout {
    pub config: Descriptor,
    pub module: Descriptor,
}

impl Layout {
    /// Judges a manifest: an OCI image manifest with a wasm config and one wasm layer, the
    /// module no larger than `max_module`.
    pub fn check(manifest: &[u8], max_module: u64) -> Result<Layout, String> {
        let m: Manifest =
            serde_json::from_slice(manifest).map_err(|e| format!("the manifest is not an OCI image manifest: {e}"))?;
        if m.schema_version != 2 || m.media_type.as_deref() != Some(MANIFEST) {
            return Err(format!(
                "the manifest's media type is {}, not {MANIFEST} (schema 2)",
                m.media_type.as_deref().unwrap_or("unset")
            ));
        }
        if m.config.media_type != CONFIG {
            return Err(format!(
                "the config's media type is {}, not {CONFIG}: not a wasm artifact",
                m.config.media_type
            ));
        }
        let [module] = m.layers.as_slice() else {
            return Err(format!(
                "the artifact has {} layers; a wasm artifact has exactly one, {MODULE}",
                m.layers.len()
            ));
        };
        if module.media_type != MODULE {
            return Err(format!("its layer's media type is {}, not {MODULE}", module.media_type));
        }
        for d in [&m.config, module] {
            if !super::reference::is_sha256(&d.digest) {
                return Err(format!("digest `{}` is not sha256:<64 hex digits>", d.digest));
            }
        }
        if m.config.size > MAX_METADATA {
            return Err(format!("its config is {} bytes; more than {MAX_METADATA} is refused", m.config.size));
        }
        if module.size > max_module {
            return Err(format!("its module is {} bytes, over fleet.max_module ({max_module} bytes)", module.size));
        }
        Ok(Layout { config: m.config.clone(), module: module.clone() })
    }

    /// Judges the config blob the manifest named: a wasm config for WASI preview 1 that lists
    /// exactly the one layer.
    pub fn check_config(&self, config: &[u8]) -> Result<(), String> {
        let c: WasmConfig = serde_json::from_slice(config)
            .map_err(|e| format!("the config is not a wasm config (architecture, os, layerDigests, created): {e}"))?;
        if c.architecture != "wasm" || c.os != "wasip1" {
            return Err(format!(
                "the config says architecture `{}`, os `{}`: edgefn runs architecture `wasm`, os `wasip1`",
                c.architecture, c.os
            ));
        }
        if c.layer_digests != [self.module.digest.clone()] {
            return Err(format!(
                "the config's layerDigests {:?} do not name the one layer {}",
                c.layer_digests, self.module.digest
            ));
        }
        Ok(())
    }

    /// Judges the module's bytes: a WebAssembly core module (preview 1 command), not a
    /// component and not native code.
    pub fn check_module(bytes: &[u8]) -> Result<(), String> {
        match bytes.get(..8) {
            Some([0, b'a', b's', b'm', 1, 0, 0, 0]) => Ok(()),
            Some([0, b'a', b's', b'm', _, _, 1, 0]) => {
                Err("the layer is a WebAssembly component; edgefn runs WASI preview 1 core modules".into())
            }
            _ => Err("the layer is not a WebAssembly module (no \\0asm header)".into()),
        }
    }

    /// The manifest and config `edgefn push` writes for `module`, its layer titled `title` (the
    /// file name `oras pull` writes it to). `created` is fixed (from `SOURCE_DATE_EPOCH` if
    /// set), so the same file always makes the same manifest digest.
    pub fn build(module: &[u8], title: &str) -> (Vec<u8>, Vec<u8>) {
        let mut module = Descriptor::of(MODULE, module);
        let mut title_annotation = serde_json::Map::new();
        title_annotation.insert("org.opencontainers.image.title".into(), title.into());
        module.annotations = Some(title_annotation);
        let config = WasmConfig {
            created: created(),
            architecture: "wasm".into(),
            os: "wasip1".into(),
            layer_digests: vec![module.digest.clone()],
        };
        let config = serde_json::to_vec(&config).expect("config serialises");
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(MANIFEST.into()),
            config: Descriptor::of(CONFIG, &config),
            layers: vec![module],
            annotations: None,
        };
        (serde_json::to_vec(&manifest).expect("manifest serialises"), config)
    }
}

fn created() -> String {
    let secs = std::env::var("SOURCE_DATE_EPOCH").ok().and_then(|s| s.parse::<i64>().ok()).unwrap_or(0);
    // RFC 3339 without a date crate: days and seconds since the epoch, civil from days.
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `sha256:<hex>` of `bytes`.
pub fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const WASM: &[u8] = b"\0asm\x01\0\0\0";

    #[test]
    fn a_built_artifact_passes_its_own_checks_and_is_reproducible() {
        let (manifest, config) = Layout::build(WASM, "f.wasm");
        assert_eq!(Layout::build(WASM, "f.wasm").0, manifest);
        let layout = Layout::check(&manifest, 1 << 20).unwrap();
        layout.check_config(&config).unwrap();
        assert_eq!(layout.module.digest, digest(WASM));
        assert!(String::from_utf8_lossy(&config).contains("\"created\":\"1970-01-01T00:00:00Z\""));
        assert_eq!(civil(20_423), (2025, 12, 1));
    }

    #[test]
    fn other_layouts_are_refused_with_a_reason() {
        let (manifest, _) = Layout::build(WASM, "f.wasm");
        let m: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
        let edit = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut m = m.clone();
            f(&mut m);
            Layout::check(&serde_json::to_vec(&m).unwrap(), 1 << 20).unwrap_err()
        };
        assert!(
            edit(&|m| m["layers"][0]["mediaType"] = "application/octet-stream".into()).contains("layer's media type")
        );
        assert!(
            edit(&|m| m["config"]["mediaType"] = "application/vnd.oci.image.config.v1+json".into())
                .contains("not a wasm artifact")
        );
        assert!(
            edit(&|m| {
                let l = m["layers"][0].clone();
                m["layers"].as_array_mut().unwrap().push(l)
            })
            .contains("2 layers")
        );
        assert!(edit(&|m| m["mediaType"] = "application/vnd.oci.image.index.v1+json".into()).contains("media type"));
        assert!(Layout::check(&manifest, 4).unwrap_err().contains("over fleet.max_module"));
        assert!(Layout::check_module(b"\0asm\x0d\0\x01\0").unwrap_err().contains("component"));
        assert!(Layout::check_module(b"\x7fELF\x02\x01\x01\0").unwrap_err().contains("not a WebAssembly module"));
        let layout = Layout::check(&manifest, 1 << 20).unwrap();
        assert!(
            layout
                .check_config(br#"{"created":"x","architecture":"amd64","os":"linux","layerDigests":[]}"#)
                .unwrap_err()
                .contains("architecture")
        );
    }
}
