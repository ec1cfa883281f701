//! FP16 (IEEE binary16) storage: no scales, codes are the little-endian f16 bytes.
//!
//! Conversion is the `half` crate's, round to nearest even; magnitudes beyond 65504 become ±inf
//! (IEEE overflow), NaN stays NaN. The slice conversions are used so that the F16C
//! instructions are used when the CPU has them (runtime detection in `half`).

use half::f16;
use half::slice::HalfFloatSliceExt;

/// Elements converted per stack buffer.
const CHUNK: usize = 256;

/// Round every element through f16 in place.
pub(crate) fn round_through_f16(xs: &mut [f32]) {
    let mut buf = [f16::ZERO; CHUNK];
    for c in xs.chunks_mut(CHUNK) {
        let h = &mut buf[..c.len()];
        h.convert_from_f32_slice(c);
        h.convert_to_f32_slice(c);
    }
}

/// Little-endian f16 bytes of `xs`.
pub(crate) fn encode(xs: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 * xs.len());
    let mut buf = [f16::ZERO; CHUNK];
    for c in xs.chunks(CHUNK) {
        let h = &mut buf[..c.len()];
        h.convert_from_f32_slice(c);
        out.extend(h.iter().flat_map(|v| v.to_le_bytes()));
    }
    out
}

/// Values of little-endian f16 bytes.
pub(crate) fn decode(bytes: &[u8]) -> Vec<f32> {
    let mut out = vec![0f32; bytes.len() / 2];
    let mut buf = [f16::ZERO; CHUNK];
    for (o, b) in out.chunks_mut(CHUNK).zip(bytes.chunks(2 * CHUNK)) {
        let h = &mut buf[..o.len()];
        for (v, p) in h.iter_mut().zip(b.chunks_exact(2)) {
            *v = f16::from_le_bytes([p[0], p[1]]);
        }
        h.convert_to_f32_slice(o);
    }
    out
}
