//! An 8-bit grey PNG, written the way `image`'s encoder writes it with fast deflate and the
//! Paeth filter, byte for byte, but deflated straight into a `Vec`. (Fast deflate with Paeth is
//! as small as the default's adaptive filter on camera frames, at a tenth of the time.)
//!
//! The `png` crate hands fdeflate a `Cursor<Vec<u8>>`, and fdeflate writes 8 bytes at a time:
//! in wasm that cursor cost 0.35 of the 1.16 ms a camera frame's deflate took (natively 0.02).
//! So the filter and the deflate are driven here, and `png` writes only the chunks around them.

use std::io::Write;

/// The PNG of `pixels`, `width` to a row, appended to `out`. `pixels` holds whole rows.
pub fn gray_png(pixels: &[u8], width: usize, out: &mut Vec<u8>) -> Result<(), String> {
    let height = if width == 0 { 0 } else { pixels.len() / width };
    let err = |e: std::io::Error| format!("deflate: {e}");
    // Paeth-filtered rows deflate to about 40 % of the pixels on camera frames.
    let mut deflate = fdeflate::Compressor::new(Vec::with_capacity(pixels.len() / 2)).map_err(err)?;
    let mut filtered = vec![0u8; width + 1];
    // Each filtered row starts with its filter type; Paeth is type 4 in the PNG specification.
    filtered[0] = 4;
    let zeros = vec![0u8; width];
    let mut above = zeros.as_slice();
    for row in pixels.chunks_exact(width.max(1)).take(height) {
        paeth(above, row, &mut filtered[1..]);
        deflate.write_data(&filtered).map_err(err)?;
        above = row;
    }
    let mut zlib = deflate.finish().map_err(err)?;
    let rows_len = (width + 1) * height;
    if zlib.len() > fdeflate::StoredOnlyCompressor::<()>::compressed_size(rows_len) {
        // Noise deflates to more than it was: stored blocks of unfiltered rows, as `png` does.
        let mut stored = fdeflate::StoredOnlyCompressor::new(std::io::Cursor::new(Vec::new())).map_err(err)?;
        for row in pixels.chunks_exact(width.max(1)).take(height) {
            stored.write_data(&[0]).map_err(err)?;
            stored.write_data(row).map_err(err)?;
        }
        zlib = stored.finish().map_err(err)?.into_inner();
    }

    // The signature and the IHDR, IDAT and IEND chunks: 57 bytes around the deflated rows.
    out.reserve(zlib.len() + 64);
    let fail = |e: png::EncodingError| format!("cannot encode: {e}");
    let (w, h) = (u32::try_from(width), u32::try_from(height));
    let (Ok(w), Ok(h)) = (w, h) else { return Err("image too large for PNG".into()) };
    let mut encoder = png::Encoder::new(out.by_ref(), w, h);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(fail)?;
    for chunk in zlib.chunks(i32::MAX as usize) {
        writer.write_chunk(png::chunk::IDAT, chunk).map_err(fail)?;
    }
    writer.finish().map_err(fail)
}

/// One row through PNG's Paeth filter (one byte a pixel): each byte less the neighbour, of
/// left, above and above-left, nearest to left + above - above-left. Without branches, so it
/// vectorises.
fn paeth(above: &[u8], row: &[u8], out: &mut [u8]) {
    let Some((&first, _)) = row.split_first() else { return };
    // Left and above-left are 0 at the row's start, so the prediction is `above`.
    out[0] = first.wrapping_sub(above[0]);
    let neighbours = row.iter().zip(&above[..]).zip(&above[1..]);
    for ((out, &cur), ((&left, &upper_left), &up)) in out[1..].iter_mut().zip(&row[1..]).zip(neighbours) {
        let (a, b, c) = (i16::from(left), i16::from(up), i16::from(upper_left));
        let (pa, pb, pc) = ((b - c).abs(), (a - c).abs(), (a + b - 2 * c).abs());
        let predicted = if pa <= pb && pa <= pc {
            left
        } else if pb <= pc {
            up
        } else {
            upper_left
        };
        *out = cur.wrapping_sub(predicted);
    }
}

#[cfg(test)]
mod tests {
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    use image::{GrayImage, ImageEncoder};

    /// What `image`'s encoder writes with the settings grayscale used before.
    fn theirs(img: &GrayImage) -> Vec<u8> {
        let mut out = Vec::new();
        PngEncoder::new_with_quality(&mut out, CompressionType::Fast, FilterType::Paeth)
            .write_image(img.as_raw(), img.width(), img.height(), image::ExtendedColorType::L8)
            .unwrap();
        out
    }

    #[test]
    fn the_same_bytes_as_images_encoder() {
        let frame = |w, h, f: fn(u32, u32) -> u8| GrayImage::from_fn(w, h, |x, y| image::Luma([f(x, y)]));
        let cases = [
            (
                "gradient and edges",
                frame(640, 480, |x, y| ((x * 255 / 640) as u8) ^ if (x / 7 + y / 5) % 2 == 0 { 0x40 } else { 0 }),
            ),
            (
                "noise (stored blocks)",
                frame(97, 33, |x, y| (x.wrapping_mul(2654435761) ^ y.wrapping_mul(40503)).to_le_bytes()[1]),
            ),
            (
                "gradient with a little noise",
                frame(640, 120, |x, y| {
                    (x / 3 + y + ((x.wrapping_mul(2654435761) ^ y.wrapping_mul(40503)) >> 29)) as u8
                }),
            ),
            ("flat (long zero runs)", frame(300, 7, |_, _| 9)),
            ("one pixel", frame(1, 1, |_, _| 200)),
            ("one column", frame(1, 50, |_, y| (y * 5) as u8)),
        ];
        for (what, img) in cases {
            let mut ours = Vec::new();
            super::gray_png(img.as_raw(), img.width() as usize, &mut ours).unwrap();
            assert_eq!(ours, theirs(&img), "{what}");
            assert_eq!(image::load_from_memory(&ours).unwrap().to_luma8(), img, "{what}");
        }
    }

    /// Against the predictor as the PNG specification writes it, for every neighbourhood.
    #[test]
    fn paeth_predicts_as_the_specification_says() {
        let spec = |a: u8, b: u8, c: u8| {
            let p = i32::from(a) + i32::from(b) - i32::from(c);
            let (pa, pb, pc) = ((p - i32::from(a)).abs(), (p - i32::from(b)).abs(), (p - i32::from(c)).abs());
            if pa <= pb && pa <= pc {
                a
            } else if pb <= pc {
                b
            } else {
                c
            }
        };
        let mut out = [0u8; 2];
        for left in 0..=255u8 {
            for up in 0..=255u8 {
                for upper_left in 0..=255u8 {
                    super::paeth(&[upper_left, up], &[left, 0], &mut out);
                    assert_eq!(out[1], spec(left, up, upper_left).wrapping_neg(), "a {left} b {up} c {upper_left}");
                }
            }
        }
    }
}
