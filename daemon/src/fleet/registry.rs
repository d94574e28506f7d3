//! Talking to an OCI registry: manifests and blobs in, and out for `edgefn push` and `sign`,
//! through `oci-client` on the daemon's own TLS stack (rustls with ring).
//!
//! Plain HTTP only for loopback and hosts `[registries]` marks insecure; HTTPS trusts the
//! system's roots plus a configured CA. Every download is capped in bytes (checked as it
//! streams, not after) and hashed against the digest that named it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use bytes::Bytes;
use futures_util::StreamExt;
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, RegistryOperation};
use sha2::{Digest, Sha256};

use super::artifact::{self, Descriptor};
use super::reference::ImageRef;
use crate::config::{Config, Fleet, Registries};

pub struct Registry {
    registries: Registries,
    fleet: Fleet,
    clients: Mutex<HashMap<String, Arc<Client>>>,
}

impl Registry {
    pub fn new(cfg: &Config) -> Registry {
        // reqwest takes the process's default provider; make it ring, the one the daemon has.
        let _ = rustls::crypto::ring::default_provider().install_default();
        Registry { registries: cfg.registries.clone(), fleet: cfg.fleet.clone(), clients: Mutex::default() }
    }

    fn client(&self, r: &ImageRef) -> anyhow::Result<Arc<Client>> {
        let host = r.registry();
        if let Some(c) = self.clients.lock().expect("clients lock").get(host) {
            return Ok(c.clone());
        }
        let settings = self.registries.get(host).cloned().unwrap_or_default();
        let plain = settings.insecure.unwrap_or_else(|| is_loopback(host));
        let protocol = if plain { ClientProtocol::Http } else { ClientProtocol::Https };
        let mut extra = Vec::new();
        if let Some(ca) = &settings.ca {
            let data =
                std::fs::read(ca).with_context(|| format!("registries.\"{host}\".ca: reading {}", ca.display()))?;
            extra.push(Certificate { encoding: CertificateEncoding::Pem, data });
        }
        let config = ClientConfig {
            protocol,
            extra_root_certificates: extra,
            read_timeout: Some(self.fleet.stall_timeout),
            connect_timeout: Some(self.fleet.stall_timeout),
            user_agent: concat!("edgefn/", env!("CARGO_PKG_VERSION")),
            platform_resolver: None,
            ..ClientConfig::default()
        };
        let client =
            Arc::new(Client::try_from(config).map_err(|e| anyhow::anyhow!("registry client for {host}: {e}"))?);
        self.clients.lock().expect("clients lock").insert(host.to_string(), client.clone());
        Ok(client)
    }

    fn auth(&self, r: &ImageRef) -> RegistryAuth {
        match self.registries.get(r.registry()) {
            Some(c) if c.token.is_some() => RegistryAuth::Bearer(c.token.clone().unwrap_or_default()),
            Some(c) if c.username.is_some() => {
                RegistryAuth::Basic(c.username.clone().unwrap_or_default(), c.password.clone().unwrap_or_default())
            }
            _ => RegistryAuth::Anonymous,
        }
    }

    /// Signs in for `op` on `r`'s repository: a bearer token from the registry's token
    /// service, or basic auth where the registry asks for that (docker-registry's htpasswd).
    async fn authenticated(&self, r: &ImageRef, op: RegistryOperation) -> anyhow::Result<Arc<Client>> {
        let client = self.client(r)?;
        client
            .auth(r.oci(), &self.auth(r), op)
            .await
            .map_err(|e| anyhow::anyhow!("{r}: signing in: {}", describe(&e)))?;
        Ok(client)
    }

    /// The manifest `r` names, its bytes and digest; None if the registry has none there.
    pub async fn manifest(&self, r: &ImageRef, accepted: &[&str]) -> anyhow::Result<Option<(Vec<u8>, String)>> {
        let client = self.authenticated(r, RegistryOperation::Pull).await?;
        match client.pull_manifest_raw(r.oci(), &self.auth(r), accepted).await {
            Ok((body, _)) => {
                anyhow::ensure!(
                    body.len() as u64 <= artifact::MAX_METADATA,
                    "{r}: the manifest is {} bytes; more than {} is refused",
                    body.len(),
                    artifact::MAX_METADATA
                );
                // The digest is ours to compute: the registry's header is not evidence.
                let digest = artifact::digest(&body);
                if let Some(pinned) = r.digest() {
                    anyhow::ensure!(
                        digest == pinned,
                        "{r}: the registry sent a manifest whose digest is {digest}, not the pinned {pinned}"
                    );
                }
                Ok(Some((body.to_vec(), digest)))
            }
            Err(e) if not_found(&e) => Ok(None),
            // oci-client checks a pinned digest too; say which promise broke.
            Err(OciDistributionError::DigestError(e)) if r.digest().is_some() => Err(anyhow::anyhow!(
                "{r}: the registry sent a manifest whose digest is not the pinned {}: {e}",
                r.digest().unwrap_or_default()
            )),
            Err(e) => Err(anyhow::anyhow!("{r}: {}", describe(&e))),
        }
    }

    /// The blob `d` names, at most `cap` bytes, checked against its digest as it arrives.
    pub async fn blob(&self, r: &ImageRef, d: &Descriptor, cap: u64) -> anyhow::Result<Vec<u8>> {
        anyhow::ensure!(d.size <= cap, "{r}: blob {} is {} bytes, over the cap of {cap}", d.digest, d.size);
        let client = self.client(r)?;
        client.store_auth_if_needed(r.registry(), &self.auth(r)).await;
        let mut stream = client
            .pull_blob_stream(r.oci(), d.digest.as_str())
            .await
            .map_err(|e| anyhow::anyhow!("{r}: blob {}: {}", d.digest, describe(&e)))?;
        let mut bytes = Vec::with_capacity(d.size.min(cap) as usize);
        let mut hash = Sha256::new();
        while let Some(chunk) = stream.stream.next().await {
            // oci-client hashes as well, and ends the stream with its own error on a mismatch.
            let chunk = chunk.map_err(|e| match chain(&e) {
                t if t.contains("digest") => anyhow::anyhow!(
                    "{r}: blob {} arrived with another digest: tampered with or damaged ({t})",
                    d.digest
                ),
                t => anyhow::anyhow!("{r}: blob {} broke off after {} bytes: {t}", d.digest, bytes.len()),
            })?;
            anyhow::ensure!(
                (bytes.len() + chunk.len()) as u64 <= d.size.min(cap),
                "{r}: blob {} is longer than the {} bytes its descriptor says",
                d.digest,
                d.size
            );
            hash.update(&chunk);
            bytes.extend_from_slice(&chunk);
        }
        let actual = format!("sha256:{}", artifact::hex(&hash.finalize()));
        anyhow::ensure!(
            actual == d.digest,
            "{r}: blob {} arrived with digest {actual}: tampered with or damaged",
            d.digest
        );
        anyhow::ensure!(
            bytes.len() as u64 == d.size,
            "{r}: blob {} is {} bytes, not {}",
            d.digest,
            bytes.len(),
            d.size
        );
        Ok(bytes)
    }

    /// Uploads a blob unless the registry has it.
    pub async fn push_blob(&self, r: &ImageRef, bytes: &[u8]) -> anyhow::Result<String> {
        let client = self.authenticated(r, RegistryOperation::Push).await?;
        let digest = artifact::digest(bytes);
        if !client.blob_exists(r.oci(), &digest).await.unwrap_or(false) {
            client
                .push_blob(r.oci(), Bytes::copy_from_slice(bytes), &digest)
                .await
                .map_err(|e| anyhow::anyhow!("{r}: pushing blob {digest}: {}", describe(&e)))?;
        }
        Ok(digest)
    }

    /// Uploads a manifest under `r`'s tag (or digest); returns its digest.
    pub async fn push_manifest(&self, r: &ImageRef, manifest: &[u8]) -> anyhow::Result<String> {
        let client = self.authenticated(r, RegistryOperation::Push).await?;
        let content_type = http::HeaderValue::from_static(artifact::MANIFEST);
        client
            .push_manifest_raw(r.oci(), Bytes::copy_from_slice(manifest), content_type)
            .await
            .map_err(|e| anyhow::anyhow!("{r}: pushing the manifest: {}", describe(&e)))?;
        Ok(artifact::digest(manifest))
    }
}

/// localhost, 127.0.0.0/8 and ::1, with or without a port.
fn is_loopback(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name == "localhost" || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn not_found(e: &OciDistributionError) -> bool {
    match e {
        OciDistributionError::ImageManifestNotFoundError(_) => true,
        OciDistributionError::RegistryError { envelope, .. } => {
            envelope.errors.iter().any(|e| matches!(e.code, OciErrorCode::ManifestUnknown | OciErrorCode::NameUnknown))
        }
        OciDistributionError::ServerError { code, .. } => *code == 404,
        _ => false,
    }
}

/// One line, with the cause's chain: reqwest's own top line alone says little ("error sending
/// request", "error decoding response body").
fn describe(e: &OciDistributionError) -> String {
    chain(e)
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_loopback_hosts_are_loopback() {
        for h in ["localhost:5000", "127.0.0.1:5000", "127.3.2.1", "[::1]:5000", "localhost"] {
            assert!(super::is_loopback(h), "{h}");
        }
        for h in ["registry.example.org", "10.0.0.1:5000", "localhost.example.org:5000", "[fe80::1]:5000"] {
            assert!(!super::is_loopback(h), "{h}");
        }
    }
}
