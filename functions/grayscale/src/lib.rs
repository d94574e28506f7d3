//! Grayscale conversion shared by the wasm function and the native benchmark.
//!
//! The contract is the seed demo's: any image the `image` crate can guess goes in,
//! a grayscale PNG comes out, or a GIF if the input was a GIF. The pixels are `image`'s own
//! `grayscale()` of the decoded image; a JPEG is decoded by jpeg-decoder where it can be,
//! which is faster in wasm ([`decode_jpeg`]).

mod encode;

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
    let decoded = match (format == ImageFormat::Jpeg).then(|| decode_jpeg(input)).flatten() {
        Some(decoded) => decoded,
        None => {
            image::load_from_memory_with_format(input, format).map_err(|e| format!("cannot decode {format:?}: {e}"))?
        }
    };
    let gray = match decoded {
        DynamicImage::ImageRgb8(rgb) => DynamicImage::ImageLuma8(rgb_to_luma(&rgb)),
        other => other.grayscale(),
    };

    let mut out = Vec::with_capacity(input.len());
    let cannot = |e: image::ImageError| format!("cannot encode: {e}");
    match (&gray, format) {
        // The GIF encoder takes RGB(A); a gray image has at most 256 colours, so its palette is exact.
        (_, ImageFormat::Gif) => DynamicImage::ImageRgba8(gray.to_rgba8())
            .write_to(&mut Cursor::new(&mut out), ImageFormat::Gif)
            .map_err(cannot)?,
        (DynamicImage::ImageLuma8(luma), _) => encode::gray_png(luma.as_raw(), luma.width() as usize, &mut out)?,
        // 16-bit or with alpha: png's own encoder, with the settings `encode` keeps.
        _ => {
            let encoder =
                png::PngEncoder::new_with_quality(&mut out, png::CompressionType::Fast, png::FilterType::Paeth);
            gray.write_with_encoder(encoder).map_err(cannot)?
        }
    }
    Ok(out)
}

/// The most a decoded frame may take: `image`'s own default allocation limit, so what it
/// would refuse is still refused.
const MAX_DECODED: usize = 512 * 1024 * 1024;

/// An 8-bit grey or colour JPEG decoded by jpeg-decoder, or `None` for anything else, or for
/// what it cannot decode: `image` (zune-jpeg) then decodes it, or gives its error. In wasm,
/// zune-jpeg runs scalar: a 640×480 frame took 2.2 ms against jpeg-decoder's 1.6 ms. The two
/// decoders round the IDCT and the chroma upsampling differently, by at most a few levels in a
/// few pixels, as any two JPEG decoders may.
fn decode_jpeg(input: &[u8]) -> Option<DynamicImage> {
    let mut decoder = jpeg_decoder::Decoder::new(input);
    decoder.set_max_decoding_buffer_size(MAX_DECODED);
    let pixels = decoder.decode().ok()?;
    let info = decoder.info()?;
    let (width, height) = (u32::from(info.width), u32::from(info.height));
    match info.pixel_format {
        jpeg_decoder::PixelFormat::RGB24 => {
            image::RgbImage::from_raw(width, height, pixels).map(DynamicImage::ImageRgb8)
        }
        jpeg_decoder::PixelFormat::L8 => GrayImage::from_raw(width, height, pixels).map(DynamicImage::ImageLuma8),
        _ => None,
    }
}

/// `image`'s sRGB luma, `(2126 R + 7152 G + 722 B) / 10000` truncated, in fixed point so it
/// vectorises to 32-bit lanes in wasm as natively: the weights scaled by 2^20 and rounded, plus
/// a bias that absorbs their rounding. Exact for every colour (`luma_matches_image_for_every_colour`);
/// the bias may be anywhere in 94..=104 for that, 99 sits in the middle. The division it
/// replaces, as an f32 division, took 0.61–0.98 ms a frame in wasm (0.37 now).
fn rgb_to_luma(rgb: &image::RgbImage) -> GrayImage {
    const R: u32 = 222_927;
    const G: u32 = 749_942;
    const B: u32 = 75_707;
    const BIAS: u32 = 99;
    let luma = rgb
        .as_raw()
        .chunks_exact(3)
        .map(|p| ((R * p[0] as u32 + G * p[1] as u32 + B * p[2] as u32 + BIAS) >> 20) as u8)
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

    /// Colourful, noisy and sharp-edged: chroma far from grey, values that clamp.
    fn jpeg(width: u32, height: u32, quality: u8) -> Vec<u8> {
        let img = image::RgbImage::from_fn(width, height, |x, y| {
            let noise = ((x.wrapping_mul(2654435761) ^ y.wrapping_mul(40503)) >> 7) as u8 & 0x1f;
            let edge = if (x / 7 + y / 5) % 2 == 0 { 255 } else { 0 };
            Rgb([(x * 255 / width) as u8 ^ noise, edge, (y * 255 / height) as u8])
        });
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality).encode_image(&img).unwrap();
        out
    }

    /// (the largest difference, the share of samples that differ) between two decodes.
    fn spread(ours: &[u8], theirs: &[u8]) -> (u8, f64) {
        assert_eq!(ours.len(), theirs.len());
        let differ = ours.iter().zip(theirs).filter(|(a, b)| a != b).count();
        (ours.iter().zip(theirs).map(|(a, b)| a.abs_diff(*b)).max().unwrap_or(0), differ as f64 / ours.len() as f64)
    }

    #[test]
    fn jpeg_decoder_agrees_with_image_but_for_rounding() {
        for (w, h, q) in [(640, 480, 75), (37, 23, 100), (1, 1, 90), (333, 17, 30)] {
            let input = jpeg(w, h, q);
            let ours = super::decode_jpeg(&input).expect("a colour JPEG");
            let theirs = image::load_from_memory(&input).unwrap();
            let (most, share) = spread(ours.as_bytes(), theirs.as_bytes());
            assert!(most <= 4 && share < 0.15, "{w}x{h} q{q}: RGB differs by up to {most} in {share:.3} of samples");
            let ours = super::grayscale(&input).unwrap();
            let (ours, theirs) = (image::load_from_memory(&ours).unwrap(), theirs.grayscale());
            let (most, share) = spread(ours.as_bytes(), theirs.as_bytes());
            assert!(most <= 3 && share < 0.1, "{w}x{h} q{q}: luma differs by up to {most} in {share:.3} of pixels");
        }
    }

    #[test]
    fn grey_jpegs_are_decoded_and_others_left_to_image() {
        let gray = image::GrayImage::from_fn(16, 16, |x, y| image::Luma([(x * y) as u8]));
        let mut input = Vec::new();
        image::codecs::jpeg::JpegEncoder::new(&mut input).encode_image(&gray).unwrap();
        let ours = super::decode_jpeg(&input).expect("a grey JPEG");
        assert!(matches!(ours, image::DynamicImage::ImageLuma8(_)));
        let (most, _) = spread(ours.as_bytes(), image::load_from_memory(&input).unwrap().as_bytes());
        assert!(most <= 3, "grey JPEG differs by {most}");
        assert!(super::decode_jpeg(&input[..input.len() / 2]).is_none(), "a cut-off JPEG");
        assert!(super::decode_jpeg(b"\xff\xd8\xff\xd9").is_none(), "no frame at all");
    }

    #[test]
    fn truncated_jpeg_is_refused() {
        assert!(super::has_jpeg_end(&[0xff, 0xd8, 0xff, 0xd9, 0, 0]));
        assert!(!super::has_jpeg_end(&[0xff, 0xd8, 0xff, 0xe0, 0x12]));
    }
}
