//! Grayscale conversion shared by the wasm function and the native benchmark.
//!
//! The contract is the seed demo's: any image the `image` crate can guess goes in,
//! a grayscale PNG comes out, or a GIF if the input was a GIF.

use std::io::Cursor;

use image::{codecs::png, ImageFormat};

/// Converts one encoded image. The error is a one-line cause fit for stderr.
pub fn grayscale(input: &[u8]) -> Result<Vec<u8>, String> {
    if input.is_empty() {
        return Err("empty input: expected an encoded image".into());
    }
    let format = image::guess_format(input).map_err(|e| format!("unrecognised image: {e}"))?;
    if format == ImageFormat::Jpeg && !has_jpeg_end(input) {
        // The decoder would fill the missing scans with gray; a cut-off frame is an error.
        return Err("truncated JPEG: no end-of-image marker".into());
    }
    let decoded = image::load_from_memory_with_format(input, format)
        .map_err(|e| format!("cannot decode {format:?}: {e}"))?;
    let gray = decoded.grayscale();

    let mut out = Vec::with_capacity(input.len());
    if format == ImageFormat::Gif {
        // The GIF encoder takes RGB(A); a gray image has at most 256 colours, so its palette is exact.
        image::DynamicImage::ImageRgba8(gray.to_rgba8())
            .write_to(&mut Cursor::new(&mut out), ImageFormat::Gif)
    } else {
        // Fast deflate: the pixels are the same as the default level, at a fraction of the time.
        let encoder = png::PngEncoder::new_with_quality(
            &mut out,
            png::CompressionType::Fast,
            png::FilterType::Adaptive,
        );
        gray.write_with_encoder(encoder)
    }
    .map_err(|e| format!("cannot encode: {e}"))?;
    Ok(out)
}

/// A complete JPEG ends with the EOI marker (FF D9), possibly followed by zero padding.
fn has_jpeg_end(data: &[u8]) -> bool {
    let end = data.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    data[..end].ends_with(&[0xff, 0xd9])
}
