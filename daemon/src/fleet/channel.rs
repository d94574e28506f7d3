//! Deploy messages: what the fleet's operator (`edgefn fleet`) sends every board, and how a
//! board judges one before it acts.
//!
//! A message is JSON ([`Order`]) that pins the image by digest and names the function, the
//! boards it is for (a label selector and a percentage), the rollout, a sequence number and
//! an expiry. It travels inside a [`Signed`] envelope: the message's exact bytes, and a
//! signature over them made as `cosign sign-blob --key` makes one (base64 DER ECDSA P-256
//! over their SHA-256), so an operator can sign with the real cosign. The board checks it
//! against `[trust] keys` and refuses, with a warning, a message that is unsigned, tampered
//! with, expired, or replayed (its sequence is not above the last one this board took).
//!
//! Waves need no coordinator: a board is in a p % wave exactly when a hash of (board id,
//! rollout id) falls under p, so widening a wave only ever adds boards.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::reference::ImageRef;
use super::trust::Trust;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Deploy `image` on trial, on the boards selected.
    Deploy,
    /// Boards that took rollout `rollout` go back to the version before it.
    Rollback,
}

/// One deploy message, as signed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Order {
    pub action: Action,
    pub rollout: String,
    pub function: String,
    /// `oci://HOST/REPO@sha256:…` (a tag beside the digest is allowed, and ignored).
    pub image: String,
    /// Labels a board must all have (`[board] labels`); empty selects every board.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// The share of the selected boards in this wave, 0 to 100.
    pub percent: f64,
    /// Strictly increasing across the operator's messages.
    pub seq: u64,
    /// RFC 3339; a board refuses the message after it.
    pub expires: String,
}

/// The signed envelope: the message's bytes, base64, and the signature over them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signed {
    pub message: String,
    pub signature: String,
}

impl Signed {
    pub fn new(message: &[u8], signature: &str) -> Signed {
        Signed {
            message: base64::engine::general_purpose::STANDARD.encode(message),
            signature: signature.trim().to_string(),
        }
    }
}

/// Why a message was not taken.
#[derive(Debug, PartialEq)]
pub enum Refusal {
    /// A message this board already took, sent again (a retained message at a reconnect):
    /// nothing to do and nothing to warn about.
    Again,
    Refused(String),
}

impl Order {
    /// Why this message cannot be acted on by any board, if it cannot.
    pub fn check(&self) -> Result<ImageRef, String> {
        if !crate::config::is_valid_name(&self.function) {
            return Err(format!("function {:?} is not a function name", self.function));
        }
        if self.rollout.is_empty() || self.rollout.len() > 128 {
            return Err("the rollout id must be 1 to 128 characters".into());
        }
        if !(0.0..=100.0).contains(&self.percent) {
            return Err(format!("percent {} is not 0 to 100", self.percent));
        }
        let image = ImageRef::parse(&self.image)?;
        if image.digest().is_none() {
            return Err(format!("{} is not pinned by digest (…@sha256:…)", self.image));
        }
        Ok(image)
    }

    fn expiry(&self) -> Result<std::time::SystemTime, String> {
        humantime::parse_rfc3339_weak(&self.expires).map_err(|e| format!("expires {:?}: {e}", self.expires))
    }

    /// Whether `board` with `labels` is among the boards this message is for.
    pub fn selects(&self, board: &str, labels: &BTreeMap<String, String>) -> bool {
        self.selector.iter().all(|(k, v)| labels.get(k) == Some(v)) && in_wave(board, &self.rollout, self.percent)
    }
}

/// A board's place in a rollout, 0 to 100, the same on every board and every run.
pub fn position(board: &str, rollout: &str) -> f64 {
    let h = Sha256::digest(format!("edgefn wave\0{board}\0{rollout}").as_bytes());
    let n = u64::from_be_bytes(h[..8].try_into().expect("8 bytes"));
    n as f64 / (u64::MAX as f64 + 1.0) * 100.0
}

/// In a `percent` % wave of `rollout`: 0 % takes no board, 100 % every board.
pub fn in_wave(board: &str, rollout: &str, percent: f64) -> bool {
    position(board, rollout) < percent
}

/// The board's side of the channel: the keys it checks with, and the last sequence it took
/// (`state_dir/fleet/channel.json`, kept across restarts so nothing old is replayed).
pub struct Inbox {
    trust: Trust,
    path: PathBuf,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Taken {
    seq: u64,
    /// The SHA-256 of the last message taken: the same bytes again are [`Refusal::Again`].
    sha256: String,
}

impl Inbox {
    pub fn new(trust: Trust, state_dir: &Path) -> Inbox {
        Inbox { trust, path: state_dir.join("fleet/channel.json") }
    }

    fn taken(&self) -> Taken {
        std::fs::read(&self.path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    }

    /// Checks a received envelope: signed by a trusted key, intact, unexpired, and newer than
    /// the last message this board took. Nothing is recorded yet: see [`Inbox::record`].
    pub fn judge(&self, envelope: &[u8]) -> Result<Judged, Refusal> {
        let refused = |why: String| Refusal::Refused(why);
        let signed: Signed = serde_json::from_slice(envelope)
            .map_err(|e| refused(format!("not a signed deploy message ({{\"message\", \"signature\"}}): {e}")))?;
        let message = base64::engine::general_purpose::STANDARD
            .decode(signed.message.trim())
            .map_err(|e| refused(format!("the message is not base64: {e}")))?;
        if signed.signature.is_empty() {
            return Err(refused("unsigned".into()));
        }
        let key =
            self.trust.verify_blob(&message, &signed.signature).map_err(|e| refused(format!("bad signature: {e}")))?;
        let order: Order =
            serde_json::from_slice(&message).map_err(|e| refused(format!("signed, but not a deploy message: {e}")))?;
        order.check().map_err(refused)?;
        let sha256 = super::artifact::hex(&Sha256::digest(&message));
        self.fresh(order.seq, &sha256)?;
        if order.expiry().map_err(refused)? < std::time::SystemTime::now() {
            return Err(refused(format!("expired at {}", order.expires)));
        }
        tracing::debug!(rollout = %order.rollout, seq = order.seq, key, "deploy message signed by a trusted key");
        Ok(Judged { order, sha256 })
    }

    /// Records a judged message's sequence durably, just before the board acts on it, so a
    /// message judged but never acted on (the generation closed first) is taken again when
    /// the broker sends it again. Refused if another message was recorded since.
    pub fn record(&self, judged: &Judged) -> Result<(), Refusal> {
        self.fresh(judged.order.seq, &judged.sha256)?;
        let taken =
            serde_json::to_vec(&Taken { seq: judged.order.seq, sha256: judged.sha256.clone() }).expect("serialises");
        super::blobs::write_durably(&self.path, &taken)
            .map_err(|e| Refusal::Refused(format!("cannot record its sequence: {e:#}")))
    }

    /// [`Inbox::judge`], then [`Inbox::record`].
    pub fn take(&self, envelope: &[u8]) -> Result<Order, Refusal> {
        let judged = self.judge(envelope)?;
        self.record(&judged)?;
        Ok(judged.order)
    }

    /// Whether `seq` is above the last sequence taken (the same message again is
    /// [`Refusal::Again`]).
    fn fresh(&self, seq: u64, sha256: &str) -> Result<(), Refusal> {
        let last = self.taken();
        if seq > last.seq {
            return Ok(());
        }
        if seq == last.seq && sha256 == last.sha256 {
            return Err(Refusal::Again);
        }
        Err(Refusal::Refused(format!("replayed: sequence {seq} is not above {}, the last this board took", last.seq)))
    }
}

/// A message [`Inbox::judge`] found sound, not yet recorded.
#[derive(Debug)]
pub struct Judged {
    pub order: Order,
    sha256: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::signer::Signer;

    fn order(seq: u64, expires: &str) -> Order {
        Order {
            action: Action::Deploy,
            rollout: "r1".into(),
            function: "grayscale".into(),
            image: format!("oci://127.0.0.1:5000/fn/g@sha256:{}", "a".repeat(64)),
            selector: BTreeMap::new(),
            percent: 100.0,
            seq,
            expires: expires.into(),
        }
    }

    fn setup() -> (tempfile::TempDir, Signer, Inbox) {
        let dir = tempfile::tempdir().unwrap();
        let key = p256::ecdsa::SigningKey::from_bytes(&[7u8; 32].into()).unwrap();
        let pem = p256::pkcs8::EncodePrivateKey::to_pkcs8_pem(&key, Default::default()).unwrap();
        std::fs::write(dir.path().join("k.pem"), pem.as_bytes()).unwrap();
        let signer = Signer::load(&dir.path().join("k.pem")).unwrap();
        std::fs::write(dir.path().join("k.pub"), signer.public_pem()).unwrap();
        let trust = Trust::load(&crate::config::Trust { keys: vec![dir.path().join("k.pub")] }).unwrap();
        let inbox = Inbox::new(trust, dir.path());
        (dir, signer, inbox)
    }

    fn seal(signer: &Signer, o: &Order) -> Vec<u8> {
        let message = serde_json::to_vec(o).unwrap();
        serde_json::to_vec(&Signed::new(&message, &signer.sign(&message))).unwrap()
    }

    #[test]
    fn signed_new_messages_are_taken_and_the_rest_refused() {
        let (_dir, signer, inbox) = setup();
        let later = "2999-01-01T00:00:00Z";
        let first = seal(&signer, &order(5, later));
        assert_eq!(inbox.take(&first).unwrap().seq, 5);
        assert_eq!(inbox.take(&first), Err(Refusal::Again));
        let why = |r: Result<Order, Refusal>| match r {
            Err(Refusal::Refused(w)) => w,
            other => panic!("not refused: {other:?}"),
        };
        assert!(why(inbox.take(&seal(&signer, &order(4, later)))).starts_with("replayed"));
        let mut changed = order(5, later);
        changed.percent = 50.0;
        assert!(why(inbox.take(&seal(&signer, &changed))).starts_with("replayed"));
        assert!(why(inbox.take(&seal(&signer, &order(6, "2001-01-01T00:00:00Z")))).starts_with("expired"));
        // Tampered: the signature of one message on the bytes of another.
        let (m7, m8) = (serde_json::to_vec(&order(7, later)).unwrap(), serde_json::to_vec(&order(8, later)).unwrap());
        let tampered = serde_json::to_vec(&Signed::new(&m8, &signer.sign(&m7))).unwrap();
        assert!(why(inbox.take(&tampered)).starts_with("bad signature"));
        let unsigned = serde_json::to_vec(&Signed::new(&m8, "")).unwrap();
        assert_eq!(why(inbox.take(&unsigned)), "unsigned");
        assert!(why(inbox.take(&m8)).starts_with("not a signed deploy message"));
        let mut floating = order(9, later);
        floating.image = "oci://127.0.0.1:5000/fn/g:v2".into();
        assert!(why(inbox.take(&seal(&signer, &floating))).contains("not pinned by digest"));
        // None of the refusals moved the sequence: the next new one is taken.
        assert_eq!(inbox.take(&seal(&signer, &order(6, later))).unwrap().seq, 6);
    }

    #[test]
    fn waves_only_widen_and_select_by_labels() {
        let boards: Vec<String> = (0..1000).map(|i| format!("board-{i}")).collect();
        let wave = |p: f64| boards.iter().filter(|b| in_wave(b, "r1", p)).cloned().collect::<Vec<_>>();
        let (ten, fifty) = (wave(10.0), wave(50.0));
        assert!((60..=140).contains(&ten.len()), "{}", ten.len());
        assert!(ten.iter().all(|b| fifty.contains(b)));
        assert_eq!((wave(0.0).len(), wave(100.0).len()), (0, 1000));
        // Another rollout draws another wave.
        assert_ne!(ten, boards.iter().filter(|b| in_wave(b, "r2", 10.0)).cloned().collect::<Vec<_>>());
        let mut o = order(1, "2999-01-01T00:00:00Z");
        o.selector = [("site".to_string(), "depot-3".to_string())].into();
        let depot3 = [("site".to_string(), "depot-3".to_string())].into();
        assert!(o.selects("b", &depot3));
        assert!(!o.selects("b", &[("site".to_string(), "depot-4".to_string())].into()));
        assert!(!o.selects("b", &BTreeMap::new()));
    }
}
