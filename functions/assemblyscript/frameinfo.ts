// frameinfo: what a frame is, without decoding it, written in AssemblyScript to show a second
// language beside Rust and C. Reads one frame on stdin and writes JSON on stdout: its format,
// width, height, colour channels and size in bytes. Useful first in a pipeline, to tell a
// camera that sends the wrong resolution from one that sends nothing useful. Reads only the
// headers (PNG's IHDR, a JPEG's start-of-frame), so it costs microseconds per frame.
// Built by functions/build.sh with npm's assemblyscript and its WASI shim.

// stdin in chunks: a frame is at most the daemon's max_body, a few MiB.
function readStdin(): Uint8Array {
  const chunks: ArrayBuffer[] = [];
  let total = 0;
  while (true) {
    const chunk = new ArrayBuffer(65536);
    const n = process.stdin.read(chunk);
    if (n <= 0) break;
    chunks.push(chunk.slice(0, n));
    total += n;
  }
  const all = new Uint8Array(total);
  let at = 0;
  for (let i = 0; i < chunks.length; i++) {
    all.set(Uint8Array.wrap(chunks[i]), at);
    at += chunks[i].byteLength;
  }
  return all;
}

function be16(b: Uint8Array, at: i32): i32 {
  return (<i32>b[at] << 8) | b[at + 1];
}

function be32(b: Uint8Array, at: i32): i64 {
  return (<i64>b[at] << 24) | (<i64>b[at + 1] << 16) | (<i64>b[at + 2] << 8) | b[at + 3];
}

class Info {
  constructor(public format: string, public width: i64, public height: i64, public channels: i32) {}
}

const PNG_SIGNATURE: u8[] = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];
// Channels per PNG colour type (0 gray, 2 RGB, 3 palette, 4 gray+alpha, 6 RGBA).
const PNG_CHANNELS: i32[] = [1, 0, 3, 3, 2, 0, 4];

function png(b: Uint8Array): Info | null {
  if (b.length < 26) return null;
  for (let i = 0; i < 8; i++) if (b[i] != PNG_SIGNATURE[i]) return null;
  // The first chunk must be IHDR: length, "IHDR", width, height, depth, colour type.
  if (b[12] != 0x49 || b[13] != 0x48 || b[14] != 0x44 || b[15] != 0x52) return null;
  const colour = <i32>b[25];
  const channels = colour < PNG_CHANNELS.length ? PNG_CHANNELS[colour] : 0;
  if (channels == 0) return null;
  return new Info("png", be32(b, 16), be32(b, 20), channels);
}

function jpeg(b: Uint8Array): Info | null {
  if (b.length < 4 || b[0] != 0xff || b[1] != 0xd8) return null;
  let at = 2;
  while (at + 4 <= b.length) {
    if (b[at] != 0xff) return null;
    const marker = <i32>b[at + 1];
    if (marker == 0xff) { at++; continue; } // fill byte
    // Markers without a length: restart markers, start/end of image, TEM.
    if ((marker >= 0xd0 && marker <= 0xd9) || marker == 0x01) { at += 2; continue; }
    const len = be16(b, at + 2);
    // Start of frame: every SOFn but DHT (C4), JPG (C8) and DAC (CC).
    if (marker >= 0xc0 && marker <= 0xcf && marker != 0xc4 && marker != 0xc8 && marker != 0xcc) {
      if (at + 10 > b.length) return null;
      return new Info("jpeg", be16(b, at + 7), be16(b, at + 5), b[at + 9]);
    }
    at += 2 + len;
  }
  return null;
}

const frame = readStdin();
let info = png(frame);
if (info == null) info = jpeg(frame);
if (info == null) {
  process.stderr.write("frameinfo: not a PNG or JPEG frame (" + frame.length.toString() + " bytes)\n");
  process.exit(1);
} else {
  const i = info!;
  process.stdout.write(
    '{"format":"' + i.format + '","width":' + i.width.toString() + ',"height":' + i.height.toString() +
      ',"channels":' + i.channels.toString() + ',"bytes":' + frame.length.toString() + "}\n",
  );
}
