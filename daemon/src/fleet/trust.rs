//! Whose functions this board runs: cosign's keyed signatures, checked against `[trust] keys`.
//!
//! An image's signatures live in the same repository at the tag `sha256-<hex>.sig`, one
//! `application/vnd.dev.cosign.simplesigning.v1+json` layer each. A layer's payload names the
//! signed manifest's digest, and its annotation `dev.cosignproject.cosign/signature` holds a
//! base64 DER ECDSA P-256 signature over the payload (SHA-256). One valid layer from a trusted
//! key whose payload names this very manifest suffices; a valid signature over another digest
//! (copied from another version) does not.
//!
//! Deploy messages are signed as `cosign sign-blob` signs a file: the same signature over the
//! message bytes ([`Trust::verify_blob`]).

use std::path::Path;

use anyhow::Context;
use base64::Engine as _;
use p256::ecdsa::signature::Verifier;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::DecodePublicKey;

use super::artifact::Descriptor;

pub const SIGNATURE_LAYER: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
pub const SIGNATURE_TYPE: &str = "cosign container image signature";

/// The tag that holds the signatures of the manifest `digest`.
pub fn signature_tag(digest: &str) -> String {
    format!("{}.sig", digest.replacen(':', "-", 1))
}

/// One signature layer: the payload's bytes and the base64 signature from its annotation.
#[derive(Debug, Clone)]
pub struct SignedPayload {
    pub payload: Vec<u8>,
    pub signature: String,
}

/// The trusted public keys, each named by the file it came from.
pub struct Trust {
    keys: Vec<(String, VerifyingKey)>,
}

impl Trust {
    pub fn load(cfg: &crate::config::Trust) -> anyhow::Result<Trust> {
        let keys = cfg
            .keys
            .iter()
            .map(|p| Ok((p.display().to_string(), read_public_key(p)?)))
            .collect::<anyhow::Result<_>>()?;
        Ok(Trust { keys })
    }

    /// Without keys every signature check passes: functions from registries load with a
    /// warning (see [`super::images`]).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key (its file) that signed the manifest `digest` in one of `layers`.
    pub fn verify_image(&self, digest: &str, layers: &[SignedPayload]) -> Result<&str, String> {
        if layers.is_empty() {
            return Err(format!("{digest} is not signed (no {} signature)", signature_tag(digest)));
        }
        let mut signed_other = None;
        for layer in layers {
            let Ok(key) = self.verify_blob(&layer.payload, &layer.signature) else {
                continue;
            };
            match claimed_digest(&layer.payload) {
                Ok(claimed) if claimed == digest => return Ok(key),
                Ok(claimed) => signed_other = Some(claimed),
                Err(why) => signed_other = Some(why),
            }
        }
        Err(match signed_other {
            Some(other) => format!(
                "a trusted key signed {other}, not this manifest {digest}: the signature belongs to another artifact"
            ),
            None => format!(
                "{digest} has {} signature(s), none by a key in [trust] keys ({})",
                layers.len(),
                self.keys.iter().map(|(f, _)| f.as_str()).collect::<Vec<_>>().join(", ")
            ),
        })
    }

    /// The key (its file) whose base64 DER signature over `message` is `signature`.
    pub fn verify_blob(&self, message: &[u8], signature: &str) -> Result<&str, String> {
        let der = base64::engine::general_purpose::STANDARD
            .decode(signature.trim())
            .map_err(|e| format!("the signature is not base64: {e}"))?;
        let sig = Signature::from_der(&der).map_err(|e| format!("the signature is not DER ECDSA: {e}"))?;
        self.keys
            .iter()
            .find(|(_, k)| k.verify(message, &sig).is_ok())
            .map(|(f, _)| f.as_str())
            .ok_or_else(|| "signed by no key in [trust] keys".to_string())
    }
}

/// The manifest digest a simple-signing payload claims, if it is a cosign image signature.
fn claimed_digest(payload: &[u8]) -> Result<String, String> {
    let p: serde_json::Value = serde_json::from_slice(payload).map_err(|e| format!("an unreadable payload ({e})"))?;
    let critical = &p["critical"];
    if critical["type"] != SIGNATURE_TYPE {
        return Err(format!("a payload of type {} (not `{SIGNATURE_TYPE}`)", critical["type"]));
    }
    // cosign's own spec example capitalises the key, and Go decodes keys case-insensitively.
    let image = critical["image"].as_object().ok_or("a payload without critical.image")?;
    image
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("docker-manifest-digest"))
        .and_then(|(_, v)| v.as_str())
        .map(str::to_string)
        .ok_or_else(|| "a payload without critical.image.docker-manifest-digest".into())
}

/// The simple-signing layers of a signature manifest, each with its signature annotation;
/// anything else in it is ignored.
pub fn signature_layers(manifest: &[u8]) -> Vec<(Descriptor, String)> {
    #[derive(serde::Deserialize)]
    struct Layers {
        layers: Vec<Descriptor>,
    }
    let Ok(m) = serde_json::from_slice::<Layers>(manifest) else {
        return Vec::new();
    };
    m.layers
        .into_iter()
        .filter(|d| d.media_type == SIGNATURE_LAYER)
        .filter_map(|d| {
            let sig = d.annotations.as_ref()?.get(SIGNATURE_ANNOTATION)?.as_str()?.to_string();
            Some((d, sig))
        })
        .collect()
}

/// The payload `edgefn sign` signs: what cosign writes for `name` (`HOST/REPO`) at `digest`.
pub fn payload(name: &str, digest: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "critical": {
            "identity": { "docker-reference": name },
            "image": { "docker-manifest-digest": digest },
            "type": SIGNATURE_TYPE,
        },
        "optional": null,
    }))
    .expect("payload serialises")
}

fn read_public_key(path: &Path) -> anyhow::Result<VerifyingKey> {
    let pem = std::fs::read_to_string(path).with_context(|| format!("trust.keys: reading {}", path.display()))?;
    let key = p256::PublicKey::from_public_key_pem(&pem).map_err(|e| {
        anyhow::anyhow!(
            "trust.keys: {} is not an ECDSA P-256 public key in PEM (as cosign.pub is): {e}",
            path.display()
        )
    })?;
    Ok(VerifyingKey::from(key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::SigningKey;
    use p256::ecdsa::signature::Signer;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32].into()).unwrap()
    }

    fn signed(k: &SigningKey, payload: Vec<u8>) -> SignedPayload {
        let sig: Signature = k.sign(&payload);
        SignedPayload { payload, signature: base64::engine::general_purpose::STANDARD.encode(sig.to_der()) }
    }

    #[test]
    fn only_a_trusted_signature_over_this_very_digest_passes() {
        let ours = key(7);
        let trust = Trust { keys: vec![("ours.pub".into(), *ours.verifying_key())] };
        let (a, b) = (format!("sha256:{}", "a".repeat(64)), format!("sha256:{}", "b".repeat(64)));
        assert_eq!(trust.verify_image(&a, &[signed(&ours, payload("h/r", &a))]), Ok("ours.pub"));
        // Any valid layer suffices, whatever comes before it.
        let theirs = signed(&key(9), payload("h/r", &a));
        assert!(trust.verify_image(&a, &[theirs.clone(), signed(&ours, payload("h/r", &a))]).is_ok());
        assert!(trust.verify_image(&a, &[theirs]).unwrap_err().contains("none by a key"));
        assert!(trust.verify_image(&a, &[signed(&ours, payload("h/r", &b))]).unwrap_err().contains("another artifact"));
        assert!(trust.verify_image(&a, &[]).unwrap_err().contains("not signed"));
        let mut tampered = signed(&ours, payload("h/r", &a));
        tampered.payload[3] ^= 1;
        assert!(trust.verify_image(&a, &[tampered]).is_err());
        let capitalised = format!(
            r#"{{"critical":{{"identity":{{"docker-reference":"h/r"}},"image":{{"Docker-manifest-digest":"{a}"}},"type":"{SIGNATURE_TYPE}"}},"optional":null}}"#
        );
        assert!(trust.verify_image(&a, &[signed(&ours, capitalised.into_bytes())]).is_ok());
        assert_eq!(signature_tag(&a), format!("sha256-{}.sig", "a".repeat(64)));
    }
}
