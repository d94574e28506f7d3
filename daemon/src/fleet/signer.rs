//! The operator's side of signing: a P-256 private key, and signatures in cosign's format.
//!
//! The key may be cosign's own `cosign.key` (`ENCRYPTED SIGSTORE PRIVATE KEY`: scrypt and
//! NaCl secretbox over PKCS#8, its password in `COSIGN_PASSWORD` as cosign reads it), or a
//! plain PKCS#8 or SEC1 PEM such as `openssl ecparam -name prime256v1 -genkey` writes. One key
//! pair then serves both tools.

use std::path::Path;

use anyhow::Context;
use base64::Engine as _;
use crypto_secretbox::aead::{Aead, KeyInit};
use p256::ecdsa::signature::Signer as _;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::DecodePrivateKey;
use serde::Deserialize;

pub struct Signer {
    key: SigningKey,
}

impl Signer {
    /// Reads `path`; an encrypted cosign key is opened with `COSIGN_PASSWORD`.
    pub fn load(path: &Path) -> anyhow::Result<Signer> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let (label, der) = p256::pkcs8::der::pem::decode_vec(text.trim().as_bytes())
            .map_err(|e| anyhow::anyhow!("{} is not a PEM key: {e}", path.display()))?;
        let key = match label {
            "ENCRYPTED SIGSTORE PRIVATE KEY" | "ENCRYPTED COSIGN PRIVATE KEY" => {
                let pkcs8 = open_cosign_key(&der).with_context(|| format!("opening {}", path.display()))?;
                SigningKey::from_pkcs8_der(&pkcs8)
                    .map_err(|e| anyhow::anyhow!("{}: not an ECDSA P-256 key: {e}", path.display()))?
            }
            "PRIVATE KEY" => SigningKey::from_pkcs8_der(&der)
                .map_err(|e| anyhow::anyhow!("{}: not an ECDSA P-256 key: {e}", path.display()))?,
            "EC PRIVATE KEY" => p256::SecretKey::from_sec1_der(&der)
                .map(SigningKey::from)
                .map_err(|e| anyhow::anyhow!("{}: not an ECDSA P-256 key: {e}", path.display()))?,
            other => anyhow::bail!("{} holds a `{other}`, not a private key", path.display()),
        };
        Ok(Signer { key })
    }

    /// Base64 of the DER ECDSA signature over SHA-256 of `message`, as cosign writes it.
    pub fn sign(&self, message: &[u8]) -> String {
        let sig: Signature = self.key.sign(message);
        base64::engine::general_purpose::STANDARD.encode(sig.to_der())
    }

    /// The public key in PEM, as `cosign.pub` holds it.
    pub fn public_pem(&self) -> String {
        use p256::pkcs8::{EncodePublicKey, LineEnding};
        self.key.verifying_key().to_public_key_pem(LineEnding::LF).expect("a P-256 key encodes")
    }
}

#[derive(Deserialize)]
struct Sealed {
    kdf: Kdf,
    cipher: Cipher,
    #[serde(with = "b64")]
    ciphertext: Vec<u8>,
}

#[derive(Deserialize)]
struct Kdf {
    name: String,
    params: ScryptParams,
    #[serde(with = "b64")]
    salt: Vec<u8>,
}

#[derive(Deserialize)]
#[allow(non_snake_case)]
struct ScryptParams {
    N: u64,
    r: u32,
    p: u32,
}

#[derive(Deserialize)]
struct Cipher {
    name: String,
    #[serde(with = "b64")]
    nonce: Vec<u8>,
}

mod b64 {
    use base64::Engine as _;
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s: String = serde::Deserialize::deserialize(d)?;
        base64::engine::general_purpose::STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}

/// The PKCS#8 DER inside cosign's sealed key, with the password from `COSIGN_PASSWORD`.
fn open_cosign_key(sealed: &[u8]) -> anyhow::Result<Vec<u8>> {
    let s: Sealed = serde_json::from_slice(sealed).context("not cosign's sealed-key JSON")?;
    anyhow::ensure!(
        s.kdf.name == "scrypt" && s.cipher.name == "nacl/secretbox",
        "sealed with {}/{}, not scrypt/nacl/secretbox",
        s.kdf.name,
        s.cipher.name
    );
    anyhow::ensure!(s.kdf.params.N.is_power_of_two(), "scrypt N {} is not a power of two", s.kdf.params.N);
    let params = scrypt::Params::new(s.kdf.params.N.trailing_zeros() as u8, s.kdf.params.r, s.kdf.params.p, 32)
        .map_err(|e| anyhow::anyhow!("scrypt parameters: {e}"))?;
    let password = std::env::var("COSIGN_PASSWORD").unwrap_or_default();
    let mut key = [0u8; 32];
    scrypt::scrypt(password.as_bytes(), &s.kdf.salt, &params, &mut key).map_err(|e| anyhow::anyhow!("scrypt: {e}"))?;
    anyhow::ensure!(s.cipher.nonce.len() == 24, "the nonce is {} bytes, not 24", s.cipher.nonce.len());
    crypto_secretbox::XSalsa20Poly1305::new(&key.into())
        .decrypt(s.cipher.nonce.as_slice().into(), s.ciphertext.as_slice())
        .map_err(|_| anyhow::anyhow!("wrong password (COSIGN_PASSWORD), or the key is damaged"))
}
