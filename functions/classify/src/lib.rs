//! ImageNet classification around a model the host runs: everything but the inference.
//!
//! Shared by the wasm function (`main.rs`, which calls wasi-nn through [`nn`] when built for
//! wasm) and the native reference in the daemon's tests and benchmark, so both sides prepare
//! and rank the same way.

#[cfg(target_arch = "wasm32")]
pub mod nn;

use std::io::{Cursor, Read, Seek, SeekFrom};

use fast_image_resize::images::Image;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::ImageFormat;

/// The model's input edge: [1, SIZE, SIZE, 3] u8 RGB.
pub const SIZE: u32 = 224;

/// The labels file TFLite's metadata writer packs into the model (an appended zip).
const LABELS_ENTRY: &str = "labels_without_background.txt";

/// Decodes a JPEG, PNG or GIF frame and resizes it (bilinear, aspect not kept) to
/// SIZE × SIZE RGB, the model's input. The error is a one-line cause fit for stderr.
pub fn preprocess(input: &[u8]) -> Result<Vec<u8>, String> {
    if input.is_empty() {
        return Err("empty input: expected a JPEG, PNG or GIF image".into());
    }
    let format = image::guess_format(input).map_err(|e| format!("unrecognised image: {e}"))?;
    if !matches!(format, ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::Gif) {
        return Err(format!("unsupported image format {format:?}: expected JPEG, PNG or GIF"));
    }
    if format == ImageFormat::Jpeg && !has_jpeg_end(input) {
        // The decoder would fill the missing scans with gray and classify that.
        return Err("truncated JPEG: no end-of-image marker".into());
    }
    let decoded =
        image::load_from_memory_with_format(input, format).map_err(|e| format!("cannot decode {format:?}: {e}"))?;
    let rgb = decoded.into_rgb8();
    let (width, height) = rgb.dimensions();
    let src =
        Image::from_vec_u8(width, height, rgb.into_raw(), PixelType::U8x3).map_err(|e| format!("image buffer: {e}"))?;
    let mut dst = Image::new(SIZE, SIZE, PixelType::U8x3);
    // fast_image_resize: the same bilinear filter as `image`'s Triangle, in fixed point with
    // simd128 in wasm (and SSE4.1/AVX2/NEON natively), at a fraction of the time.
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    Resizer::new().resize(&src, &mut dst, &options).map_err(|e| format!("resize: {e}"))?;
    Ok(dst.into_vec())
}

/// A complete JPEG ends with the EOI marker (FF D9), possibly followed by zero padding.
fn has_jpeg_end(data: &[u8]) -> bool {
    let end = data.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    data[..end].ends_with(&[0xff, 0xd9])
}

/// The class names packed inside a `.tflite` model, one per output index.
///
/// The zip sits at the end of the file, so only the tail is read, in one call: letting the zip
/// reader seek and read about the file through WASI costs several times more.
pub fn labels_from_model(mut model: impl Read + Seek) -> Result<Vec<String>, String> {
    const TAIL: u64 = 64 * 1024;
    let io = |e: std::io::Error| format!("reading the model file: {e}");
    let len = model.seek(SeekFrom::End(0)).map_err(io)?;
    let start = len.saturating_sub(TAIL);
    model.seek(SeekFrom::Start(start)).map_err(io)?;
    // One exact read: under WASI every read is a trip to the host's blocking pool.
    let mut tail = vec![0; (len - start) as usize];
    model.read_exact(&mut tail).map_err(io)?;
    let read = |r| -> Result<Vec<String>, String> {
        let mut zip = zip::ZipArchive::new(r).map_err(|e| format!("no labels packed in the model: {e}"))?;
        let mut entry = zip.by_name(LABELS_ENTRY).map_err(|e| format!("model has no {LABELS_ENTRY}: {e}"))?;
        let mut text = String::new();
        entry.read_to_string(&mut text).map_err(|e| format!("reading {LABELS_ENTRY}: {e}"))?;
        Ok(text.lines().map(|l| l.trim().to_string()).collect())
    };
    match read(Tail { start, bytes: Cursor::new(tail) }) {
        // A zip larger than the tail (a model with very many labels): read all of it.
        Err(_) if start > 0 => {
            model.seek(SeekFrom::Start(0)).map_err(io)?;
            let mut all = Vec::new();
            model.read_to_end(&mut all).map_err(io)?;
            read(Tail { start: 0, bytes: Cursor::new(all) })
        }
        labels => labels,
    }
}

/// The last bytes of a file at their original offsets: the zip's offsets count from the
/// start of the model, not of the zip.
struct Tail {
    start: u64,
    bytes: Cursor<Vec<u8>>,
}

impl Read for Tail {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.bytes.read(buf)
    }
}

impl Seek for Tail {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let to = match to {
            SeekFrom::Start(at) => SeekFrom::Start(at.checked_sub(self.start).ok_or(std::io::ErrorKind::InvalidInput)?),
            other => other,
        };
        Ok(self.start + self.bytes.seek(to)?)
    }
}

/// One class and its probability.
#[derive(Debug, Clone, PartialEq)]
pub struct Guess {
    pub label: String,
    pub score: f64,
}

/// The five best classes, best first. `output` is the model's probabilities: u8 with scale
/// 1/256 (a quantized softmax) when it has one byte per label, else little-endian f32.
pub fn rank(output: &[u8], labels: &[String]) -> Result<Vec<Guess>, String> {
    let scores: Vec<f64> = if output.len() == labels.len() {
        output.iter().map(|&q| q as f64 / 256.0).collect()
    } else if output.len() == labels.len() * 4 {
        output.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64).collect()
    } else {
        return Err(format!("model output has {} bytes for {} labels", output.len(), labels.len()));
    };
    let mut order: Vec<usize> = (0..scores.len()).collect();
    // Stable, so equal scores keep label order on every platform.
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    Ok(order.into_iter().take(5).map(|i| Guess { label: labels[i].clone(), score: scores[i] }).collect())
}

/// `{"label", "score", "top": [{"label", "score"} × 5], "model"}`.
pub fn to_json(top: &[Guess], model: &str) -> String {
    let guess = |g: &Guess| serde_json::json!({ "label": g.label, "score": g.score });
    serde_json::json!({
        "label": top[0].label,
        "score": top[0].score,
        "top": top.iter().map(guess).collect::<Vec<_>>(),
        "model": model,
    })
    .to_string()
}

/// The seed's sentence; its thresholds were 200, 125 and 50 out of 255.
pub fn sentence(best: &Guess) -> String {
    let how = if best.score > 0.78 {
        "is very likely"
    } else if best.score > 0.49 {
        "is likely"
    } else if best.score > 0.20 {
        "could be"
    } else {
        return "No confident match in the picture.".into();
    };
    format!("It {how} a {} in the picture", best.label)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("class {i}")).collect()
    }

    #[test]
    fn ranks_u8_and_f32_outputs() {
        let mut q = vec![0u8; 10];
        q[7] = 200;
        q[2] = 30;
        let top = rank(&q, &labels(10)).unwrap();
        assert_eq!(top.len(), 5);
        assert_eq!(top[0], Guess { label: "class 7".into(), score: 200.0 / 256.0 });
        assert_eq!(top[1].label, "class 2");

        let f: Vec<u8> = (0..10).flat_map(|i| (i as f32 / 10.0).to_le_bytes()).collect();
        assert_eq!(rank(&f, &labels(10)).unwrap()[0].label, "class 9");
        assert!(rank(&[0; 7], &labels(10)).is_err());
    }

    /// A model-like file: a large prefix, then a zip whose offsets count from the file start.
    fn model_with_labels(prefix: usize, labels: &str) -> Cursor<Vec<u8>> {
        use std::io::Write;
        let mut file = Cursor::new(vec![7u8; prefix]);
        file.seek(SeekFrom::End(0)).unwrap();
        let mut zip = zip::ZipWriter::new(file);
        let stored = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        zip.start_file(LABELS_ENTRY, stored).unwrap();
        zip.write_all(labels.as_bytes()).unwrap();
        let mut file = zip.finish().unwrap();
        file.set_position(0);
        file
    }

    #[test]
    fn labels_come_from_the_zip_at_the_end_of_the_model() {
        let labels = (0..1000).map(|i| format!("label {i}\n")).collect::<String>();
        let got = labels_from_model(model_with_labels(300_000, &labels)).unwrap();
        assert_eq!((got.len(), got[999].as_str()), (1000, "label 999"));
        // More labels than the tail holds: the whole file is read instead.
        let many = (0..20_000).map(|i| format!("label {i}\n")).collect::<String>();
        assert_eq!(labels_from_model(model_with_labels(300_000, &many)).unwrap().len(), 20_000);
        assert!(labels_from_model(Cursor::new(vec![0u8; 200_000])).unwrap_err().contains("no labels"));
    }

    #[test]
    fn sentences_follow_the_seed_thresholds() {
        let g = |score| Guess { label: "tabby".into(), score };
        assert_eq!(sentence(&g(0.8)), "It is very likely a tabby in the picture");
        assert_eq!(sentence(&g(0.5)), "It is likely a tabby in the picture");
        assert_eq!(sentence(&g(0.3)), "It could be a tabby in the picture");
        assert_eq!(sentence(&g(0.1)), "No confident match in the picture.");
    }

    #[test]
    fn rejects_what_it_cannot_classify() {
        assert!(preprocess(b"").unwrap_err().contains("empty"));
        assert!(preprocess(b"not an image at all").unwrap_err().contains("unrecognised"));
        assert!(preprocess(&[0xff, 0xd8, 0xff, 0xe0, 0, 0x10]).unwrap_err().contains("truncated"));
    }

    #[test]
    fn a_one_pixel_image_becomes_a_full_input() {
        let mut png = Vec::new();
        image::RgbImage::from_pixel(1, 1, image::Rgb([9, 8, 7]))
            .write_to(&mut std::io::Cursor::new(&mut png), ImageFormat::Png)
            .unwrap();
        let input = preprocess(&png).unwrap();
        assert_eq!(input.len(), (SIZE * SIZE * 3) as usize);
        assert_eq!(&input[..3], &[9, 8, 7]);
    }
}
