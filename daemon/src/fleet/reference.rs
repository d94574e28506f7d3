//! An image reference as the config writes it: `oci://HOST[:PORT]/REPO:TAG` or
//! `oci://HOST[:PORT]/REPO@sha256:DIGEST`.
//!
//! The registry host is always explicit: a bare `repo:tag` would silently mean Docker Hub.

use std::fmt;

use oci_client::Reference;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    inner: Reference,
}

impl ImageRef {
    /// Parses a reference, with or without the `oci://` scheme.
    pub fn parse(text: &str) -> Result<ImageRef, String> {
        let bare = text.strip_prefix("oci://").unwrap_or(text);
        let host = bare.split('/').next().unwrap_or_default();
        if !bare.contains('/') || !(host.contains('.') || host.contains(':') || host == "localhost") {
            return Err(format!(
                "`{text}` names no registry host: write oci://HOST[:PORT]/REPO:TAG or oci://HOST[:PORT]/REPO@sha256:DIGEST"
            ));
        }
        let inner = Reference::try_from(bare).map_err(|e| format!("`{text}` is not an image reference: {e}"))?;
        if let Some(d) = inner.digest()
            && !is_sha256(d)
        {
            return Err(format!("`{text}`: the digest must be sha256:<64 hex digits>"));
        }
        if inner.tag().is_none() && inner.digest().is_none() {
            return Err(format!("`{text}` names neither a tag nor a digest"));
        }
        Ok(ImageRef { inner })
    }

    /// The registry, `HOST[:PORT]`, as `[registries]` keys it.
    pub fn registry(&self) -> &str {
        self.inner.resolve_registry()
    }

    pub fn repository(&self) -> &str {
        self.inner.repository()
    }

    /// The pinned manifest digest, if the reference has one.
    pub fn digest(&self) -> Option<&str> {
        self.inner.digest()
    }

    /// The same repository at another tag (a signature's `sha256-<hex>.sig`).
    pub fn with_tag(&self, tag: &str) -> ImageRef {
        let inner = Reference::with_tag(self.inner.registry().to_string(), self.repository().to_string(), tag.into());
        ImageRef { inner }
    }

    /// The same repository pinned to `digest`.
    pub fn with_digest(&self, digest: &str) -> ImageRef {
        let inner =
            Reference::with_digest(self.inner.registry().to_string(), self.repository().to_string(), digest.into());
        ImageRef { inner }
    }

    /// `HOST[:PORT]/REPO`: what a cosign payload names as the signed image's reference.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry(), self.repository())
    }

    pub(crate) fn oci(&self) -> &Reference {
        &self.inner
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "oci://{}", self.inner.whole())
    }
}

pub fn is_sha256(digest: &str) -> bool {
    digest
        .strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

#[cfg(test)]
mod tests {
    use super::ImageRef;

    #[test]
    fn references_name_their_registry_and_a_tag_or_digest() {
        let r = ImageRef::parse("oci://127.0.0.1:5000/edge/grayscale:v2").unwrap();
        assert_eq!((r.registry(), r.repository(), r.digest()), ("127.0.0.1:5000", "edge/grayscale", None));
        let d = format!("sha256:{}", "ab".repeat(32));
        let p = ImageRef::parse(&format!("registry.example.org/fn@{d}")).unwrap();
        assert_eq!(p.digest(), Some(d.as_str()));
        assert_eq!(p.with_tag("x").to_string(), "oci://registry.example.org/fn:x");
        for bad in ["grayscale:v1", "oci://grayscale", "oci://h.example/fn@sha256:12", "oci://h.example/Fn:v1"] {
            assert!(ImageRef::parse(bad).is_err(), "{bad}");
        }
    }
}
