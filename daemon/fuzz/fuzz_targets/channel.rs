//! What the fleet channel brings in: deploy-message envelopes from the broker or the sidecar,
//! the messages inside them, and the boards' deployment events the operator reads. Any bytes
//! are refused with a sentence, never a panic, and nothing unsigned moves the sequence.
#![no_main]

use edgefn::fleet::channel::{Inbox, Order, Refusal};
use edgefn::fleet::events::Deployment;
use edgefn::fleet::trust::Trust;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    static INBOX: std::sync::OnceLock<Inbox> = std::sync::OnceLock::new();
    let inbox = INBOX.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("edgefn-fuzz-channel-{}", std::process::id()));
        Inbox::new(Trust::load(&Default::default()).unwrap(), &dir)
    });
    // No key is trusted: every envelope must be refused, for a reason.
    match inbox.take(data) {
        Err(Refusal::Refused(why)) => assert!(!why.is_empty()),
        other => panic!("taken without a trusted key: {other:?}"),
    }
    if let Ok(order) = serde_json::from_slice::<Order>(data) {
        let _ = order.check();
        let _ = order.selects("board", &Default::default());
    }
    let _ = Deployment::from_cloudevent(data);
});
