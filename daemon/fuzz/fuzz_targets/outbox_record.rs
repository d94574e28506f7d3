//! An outbox table value (bytes read back from disk): a record or an error, and a record that
//! decodes encodes back to one that decodes the same.
#![no_main]

use edgefn::sinks::outbox::{decode, encode};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok((record, payload)) = decode(data) {
        let again = encode(&record, &payload);
        let (r2, p2) = decode(&again).expect("a re-encoded record decodes");
        assert_eq!(r2, record);
        assert_eq!(p2, payload);
    }
});
