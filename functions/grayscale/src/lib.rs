//! Grayscale conversion shared by the wasm function and the native benchmark.
//!
//! The contract is the seed demo's: any image the `image` crate can guess goes in,
//! a grayscale PNG comes out, or a GIF if the input was a GIF. The pixels are exactly
//! `image`'s own `grayscale()`; only the speed differs.

use std::io::Cursor;

use image::{codecs::png, DynamicImage, GrayImage, ImageFormat};

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
    let decoded =
        image::load_from_memory_with_format(input, format).map_err(|e| format!("cannot decode {format:?}: {e}"))?;
    let gray = match decoded {
        DynamicImage::ImageRgb8(rgb) => DynamicImage::ImageLuma8(rgb_to_luma(&rgb)),
        other => other.grayscale(),
    };

    let mut out = Vec::with_capacity(input.len());
    if format == ImageFormat::Gif {
        // The GIF encoder takes RGB(A); a gray image has at most 256 colours, so its palette is exact.
        DynamicImage::ImageRgba8(gray.to_rgba8()).write_to(&mut Cursor::new(&mut out), ImageFormat::Gif)
    } else {
        // Fast deflate with Paeth: as small as the default's adaptive filter on camera frames,
        // at a tenth of the time. The pixels are the same whatever the settings.
        let encoder = png::PngEncoder::new_with_quality(&mut out, png::CompressionType::Fast, png::FilterType::Paeth);
        gray.write_with_encoder(encoder)
    }
    .map_err(|e| format!("cannot encode: {e}"))?;
    Ok(out)
}

/// `image`'s sRGB luma, `(2126 R + 7152 G + 722 B) / 10000` truncated, written so it vectorises:
/// the integer division becomes an f32 division, which is exact here (the sum is below 2^22,
/// and f32 spacing near 255 is far finer than 1/10000), as `luma_matches_image` checks for every colour.
fn rgb_to_luma(rgb: &image::RgbImage) -> GrayImage {
    let luma = rgb
        .as_raw()
        .chunks_exact(3)
        .map(|p| {
            let sum = 2126 * p[0] as u32 + 7152 * p[1] as u32 + 722 * p[2] as u32;
            (sum as f32 / 10000.0) as u8
        })
        .collect();
    GrayImage::from_raw(rgb.width(), rgb.height(), luma).expect("one byte per pixel")
}

/// A complete JPEG ends with the EOI marker (FF D9), possibly followed by zero padding.
fn has_jpeg_end(data: &[u8]) -> bool {
    let end = data.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    data[..end].ends_with(&[0xff, 0xd9])
}

#[cfg(test)]
mod tests {
    use image::{Pixel, Rgb};

    #[test]
    fn luma_matches_image_for_every_colour() {
        let mut row = image::RgbImage::new(256 * 256, 1);
        for r in 0..=255u8 {
            for (i, px) in row.pixels_mut().enumerate() {
                *px = Rgb([r, (i >> 8) as u8, i as u8]);
            }
            let ours = super::rgb_to_luma(&row);
            for (p, l) in row.pixels().zip(ours.pixels()) {
                assert_eq!(p.to_luma(), *l, "{p:?}");
            }
        }
    }

    #[test]
    fn truncated_jpeg_is_refused() {
        assert!(super::has_jpeg_end(&[0xff, 0xd8, 0xff, 0xd9, 0, 0]));
        assert!(!super::has_jpeg_end(&[0xff, 0xd8, 0xff, 0xe0, 0x12]));
    }
}
