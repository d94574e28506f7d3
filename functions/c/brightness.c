/*
 * brightness: a camera-tampering check, written in C to show that any language with a WASI
 * libc can be an edgefn function. Reads one JPEG or PNG frame on stdin and writes one JSON
 * object on stdout: the mean luma (0-255), its spread, and `covered` when the lens looks dark
 * or covered (too dark, or too even for a real scene). Decoding is stb_image from Debian's
 * libstb-dev; built by functions/build.sh with clang --target=wasm32-wasi and wasi-libc.
 *
 * Thresholds come from the environment (the function's `env` in edgefn.toml), because what
 * counts as dark depends on the site: COVERED_BELOW (mean luma, default 24) and
 * FLAT_BELOW (standard deviation, default 6).
 */
#define STB_IMAGE_IMPLEMENTATION
#define STBI_ONLY_JPEG
#define STBI_ONLY_PNG
#define STBI_NO_STDIO
#define STBI_NO_LINEAR
#define STBI_NO_HDR
#include <stb/stb_image.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A frame is at most the daemon's max_body (a few MiB); grow the buffer as stdin arrives. */
static unsigned char *read_all(FILE *in, size_t *len) {
    size_t cap = 1 << 16, n = 0;
    unsigned char *buf = malloc(cap);
    while (buf) {
        n += fread(buf + n, 1, cap - n, in);
        if (n < cap) break;
        unsigned char *bigger = realloc(buf, cap * 2);
        if (!bigger) { free(buf); return NULL; }
        buf = bigger;
        cap *= 2;
    }
    *len = n;
    return buf;
}

static double env_or(const char *name, double fallback) {
    const char *v = getenv(name);
    char *end;
    double d = v ? strtod(v, &end) : fallback;
    return (v && (end == v || *end)) ? fallback : d;
}

int main(void) {
    size_t len = 0;
    unsigned char *frame = read_all(stdin, &len);
    if (!frame) { fputs("brightness: out of memory reading the frame\n", stderr); return 1; }
    int w, h, channels;
    /* One channel: stb_image converts colour to luma (ITU-R BT.601 weights). */
    unsigned char *luma = stbi_load_from_memory(frame, (int)len, &w, &h, &channels, 1);
    free(frame);
    if (!luma) {
        fprintf(stderr, "brightness: not a JPEG or PNG frame: %s\n", stbi_failure_reason());
        return 1;
    }
    size_t pixels = (size_t)w * (size_t)h;
    double sum = 0, sq = 0;
    for (size_t i = 0; i < pixels; i++) {
        sum += luma[i];
        sq += (double)luma[i] * luma[i];
    }
    stbi_image_free(luma);
    double mean = sum / pixels;
    double stddev = sqrt(fmax(0.0, sq / pixels - mean * mean));
    int covered = mean < env_or("COVERED_BELOW", 24) || stddev < env_or("FLAT_BELOW", 6);
    printf("{\"mean_luma\":%.1f,\"stddev\":%.1f,\"covered\":%s,\"width\":%d,\"height\":%d}\n", mean, stddev,
           covered ? "true" : "false", w, h);
    return 0;
}
