//! The board this daemon runs on, as the results name it.
//!
//! Several boards may split one camera feed (an MQTT shared subscription): each numbers its
//! results per camera on its own, so a result id is unique only with the board in it. The id
//! is `[board] id`, or else derived from `/etc/machine-id`. systemd asks that the machine id
//! itself never leave the machine, so what is sent is a hash of it, keyed for edgefn (as
//! `sd_id128_get_machine_app_specific` does), stable for the life of the installation.

use sha2::{Digest, Sha256};

use crate::config;

/// The board's id: configured, else from the machine id, else from the host name.
pub fn id(cfg: &config::Board) -> String {
    if let Some(id) = &cfg.id {
        return id.clone();
    }
    let machine =
        std::fs::read_to_string("/etc/machine-id").ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
    match machine {
        Some(m) => {
            let digest = Sha256::digest(format!("edgefn board id\0{m}").as_bytes());
            digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
        }
        None => {
            let host = nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_default();
            let host: String =
                host.chars().filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c)).take(64).collect();
            if host.is_empty() { "board".into() } else { host }
        }
    }
}

/// Board ids end up in result ids, CloudEvent sources and file names.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_derived_id_is_valid_and_stable() {
        let cfg = crate::config::Board::default();
        let id = super::id(&cfg);
        assert!(super::valid_id(&id), "{id}");
        assert_eq!(id, super::id(&cfg));
        let named = crate::config::Board { id: Some("depot-7".into()), ..Default::default() };
        assert_eq!(super::id(&named), "depot-7");
        assert!(!super::valid_id("a/b") && !super::valid_id(""));
    }
}
