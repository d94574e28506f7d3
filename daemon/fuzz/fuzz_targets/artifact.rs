//! What a registry sends: manifests, wasm configs, signature manifests and their base64 DER
//! signatures. Any bytes are an artifact or a sentence, never a panic.
#![no_main]

use edgefn::fleet::{artifact::Layout, trust};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (head, tail) = data.split_at(data.len() / 2);
    if let Ok(layout) = Layout::check(head, 1 << 20) {
        let _ = layout.check_config(tail);
    }
    let _ = Layout::check_module(data);
    let untrusting = trust::Trust::load(&Default::default()).unwrap();
    for (_, signature) in trust::signature_layers(data) {
        let payload = trust::SignedPayload { payload: tail.to_vec(), signature };
        let _ = untrusting.verify_image("sha256:0", &[payload]);
    }
    if let Ok(text) = std::str::from_utf8(tail) {
        let _ = untrusting.verify_blob(head, text);
    }
});
