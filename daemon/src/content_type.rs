//! Content-Type of a function's output, sniffed from its bytes: functions only write stdout,
//! so the bytes are all there is to go on.

pub fn sniff(body: &[u8]) -> &'static str {
    if body.starts_with(b"\x89PNG\r\n\x1a\n") {
        "image/png"
    } else if body.starts_with(b"GIF87a") || body.starts_with(b"GIF89a") {
        "image/gif"
    } else if body.starts_with(b"\xff\xd8\xff") {
        "image/jpeg"
    } else if looks_like_json(body) {
        "application/json"
    } else if std::str::from_utf8(body).is_ok() {
        "text/plain; charset=utf-8"
    } else {
        "application/octet-stream"
    }
}

fn looks_like_json(body: &[u8]) -> bool {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    matches!(first, Some(b'{' | b'[')) && serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok()
}

#[cfg(test)]
mod tests {
    use super::sniff;

    #[test]
    fn sniffs_common_outputs() {
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\nrest"), "image/png");
        assert_eq!(sniff(b"GIF89a..."), "image/gif");
        assert_eq!(sniff(b" {\"label\": \"cat\"}\n"), "application/json");
        assert_eq!(sniff(b"{not json"), "text/plain; charset=utf-8");
        assert_eq!(sniff(b"It is very likely a cat"), "text/plain; charset=utf-8");
        assert_eq!(sniff(&[0xff, 0xfe, 0x00, 0x80]), "application/octet-stream");
    }
}
