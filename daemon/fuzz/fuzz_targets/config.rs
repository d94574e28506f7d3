//! The config file: any text is a config or a clear error, never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = edgefn::config::Config::parse(text);
    }
});
