//! The config file: any text is a config or a clear error, never a panic; and a config that
//! parses builds its broker connection's options without a panic either (rumqttc asserts in
//! its setters, which once took the daemon down at a reload).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(cfg) = edgefn::config::Config::parse(text) {
            if let Some(mut mqtt) = cfg.mqtt {
                // TLS files are read, not fuzzed: a generated `ca = "/dev/zero"` would only hang.
                (mqtt.ca, mqtt.cert, mqtt.key) = (None, None, None);
                let _ = edgefn::mqtt::connect(&mqtt, "", 1 << 20);
            }
        }
    }
});
