//! What the sidecar sends: an event (CloudEvent) for a pipeline, and its replies to a publish
//! (`failedEntries`, `errorCode`). An event's camera is always a valid camera id.
#![no_main]

use edgefn::ingress::dapr::unwrap_event;
use edgefn::sinks::dapr::{error_code, failed_entries};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok((camera, _topic, _data)) = unwrap_event(data) {
        assert!(edgefn::pipeline::valid_camera(&camera), "camera {camera:?} let through");
    }
    let _ = failed_entries(data);
    let _ = error_code(data);
});
