//! Topic → camera id: `filter\ntopic`. A camera, when found, is one whole level of the topic.
#![no_main]

use edgefn::ingress::mqtt::camera_of;
use edgefn::pipeline::valid_camera;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (filter, topic) = text.split_once('\n').unwrap_or((text, ""));
    if let Some(camera) = camera_of(filter, topic) {
        assert!(
            camera.is_empty() || topic.split('/').any(|level| level == camera),
            "{camera:?} not a level of {topic:?}"
        );
        let _ = valid_camera(camera);
    }
});
