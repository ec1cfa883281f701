//! Vectorized `e^x` and a row softmax for the CPU interpreter's attention. libm's `expf` is
//! one call per element, which no loop around it can vectorize: in a SmolLM2 forward
//! (512-token windows) the attention softmax spent more time in it than in the attention's
//! products (with this module the forward went from 590 to 651 tokens/s). [`exp`] is
//! branch-free arithmetic on the float's bits instead, and [`softmax`] keeps eight independent
//! lanes for its max and sum reductions. The compiler does not vectorize [`exp`] at the
//! crate's baseline target (plain x86-64: its selects and float-to-int conversion stay
//! scalar), so on CPUs with AVX2 an explicit 8-lane version runs, operation for operation the
//! scalar arithmetic (no FMA): the same results on every CPU. SiLU keeps libm's `expf`: its
//! kernel calls `expf` and is checked bit-exact against the interpreter.

/// Smallest and largest arguments with a normal, finite `e^x` in f32.
const EXP_MIN: f32 = -87.336_55;
const EXP_MAX: f32 = 88.722_83;
/// 1.5 * 2^23: adding and subtracting it rounds to the nearest integer (ties to even).
const ROUND: f32 = 12_582_912.0;
/// ln 2 split in two (Cody-Waite): `n * LN2_HI` is exact for the `n` that occur.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Cephes' `expf` polynomial, highest degree first: `e^r ~ 1 + r + r^2 P(r)`.
const P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5, // Cephes writes 5.0000001201e-1, which is 0.5 in f32
];

/// `e^x` in f32, within 2 ulp of the exact value where that is a normal float; 0 below that
/// range (where the exact value is subnormal or 0), +inf above it, NaN for NaN. Cody-Waite
/// reduction `x = n ln2 + r`, `|r| <= ln2/2`, Cephes' degree-6 polynomial for `e^r`, and
/// `2^n` written into the exponent bits.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // Selects, not `clamp`, so NaN becomes a number here (and is restored at the end).
    let c = if x > EXP_MIN { x } else { EXP_MIN };
    let c = if c < EXP_MAX { c } else { EXP_MAX };
    let n = (c * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = c - n * LN2_HI - n * LN2_LO;
    let mut p = P[0];
    for &coef in &P[1..] {
        p = p * r + coef;
    }
    let y = (p * r * r + r) + 1.0;
    // 2^n for n in -126..=128: 2^128 is not a float, so n = 128 scales by 2^127, then by 2.
    let top = n > 127.0;
    let e = if top { n - 1.0 } else { n };
    // SAFETY: `e` is an integer in -126..=127 (`c` is clamped), so the conversion is exact.
    let bits = (unsafe { e.to_int_unchecked::<i32>() } + 127) as u32;
    let scaled = y * f32::from_bits(bits << 23);
    let scaled = if top { scaled * 2.0 } else { scaled };
    let r = if x < EXP_MIN { 0.0 } else { scaled };
    let r = if x > EXP_MAX { f32::INFINITY } else { r };
    if x.is_nan() {
        x
    } else {
        r
    }
}

/// Independent accumulators of the reductions (one AVX register of f32).
const LANES: usize = 8;

/// The largest of `v` (NaN-free input; -inf when empty).
#[inline(always)]
fn max(v: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = v.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = if x > *m { x } else { *m };
        }
    }
    let mut m = tail.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    for l in lanes {
        m = m.max(l);
    }
    m
}

/// The sum of `v` in eight lanes, then added pairwise.
#[inline(always)]
fn sum(v: &[f32]) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let chunks = v.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (s, &x) in lanes.iter_mut().zip(c) {
            *s += x;
        }
    }
    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
        + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
        + tail
}

/// `v[i] = e^(scale v[i] - max) / sum`: the softmax of `scale * v` in place (`scale > 0`),
/// the max taken for stability.
pub fn softmax(v: &mut [f32], scale: f32) {
    if v.is_empty() {
        return;
    }
    // scale > 0, so the largest scaled value is scale * max(v).
    let m = scale * max(v);
    map_exp(v, scale, -m);
    let inv = 1.0 / sum(v);
    v.iter_mut().for_each(|x| *x *= inv);
}

/// `v[i] = exp(a v[i] + b)`.
fn map_exp(v: &mut [f32], a: f32, b: f32) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present (checked above).
        done = unsafe { avx2::map_exp(v, a, b) };
    }
    v[done..].iter_mut().for_each(|x| *x = exp(*x * a + b));
}

/// [`exp`] eight lanes at a time, operation for operation the scalar arithmetic (no FMA), so
/// results do not depend on the CPU.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// `v[i] = exp(a v[i] + b)` for the leading multiple of 8 elements; returns how many.
    #[target_feature(enable = "avx2")]
    pub unsafe fn map_exp(v: &mut [f32], a: f32, b: f32) -> usize {
        let n = v.len() / 8 * 8;
        let (va, vb) = (_mm256_set1_ps(a), _mm256_set1_ps(b));
        let k = |c: f32| _mm256_set1_ps(c);
        for i in (0..n).step_by(8) {
            let p = v.as_mut_ptr().add(i);
            let x = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(p), va), vb);
            // c = min(max(x, MIN), MAX) with NaN -> MIN, as the scalar selects.
            let c = _mm256_blendv_ps(
                k(super::EXP_MIN),
                x,
                _mm256_cmp_ps::<_CMP_GT_OQ>(x, k(super::EXP_MIN)),
            );
            let c = _mm256_blendv_ps(
                k(super::EXP_MAX),
                c,
                _mm256_cmp_ps::<_CMP_LT_OQ>(c, k(super::EXP_MAX)),
            );
            let n = _mm256_sub_ps(
                _mm256_add_ps(
                    _mm256_mul_ps(c, k(std::f32::consts::LOG2_E)),
                    k(super::ROUND),
                ),
                k(super::ROUND),
            );
            let r = _mm256_sub_ps(
                _mm256_sub_ps(c, _mm256_mul_ps(n, k(super::LN2_HI))),
                _mm256_mul_ps(n, k(super::LN2_LO)),
            );
            let mut q = k(super::P[0]);
            for &coef in &super::P[1..] {
                q = _mm256_add_ps(_mm256_mul_ps(q, r), k(coef));
            }
            let y = _mm256_add_ps(
                _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(q, r), r), r),
                k(1.0),
            );
            let top = _mm256_cmp_ps::<_CMP_GT_OQ>(n, k(127.0));
            let e = _mm256_blendv_ps(n, _mm256_sub_ps(n, k(1.0)), top);
            let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
                _mm256_cvttps_epi32(e),
                _mm256_set1_epi32(127),
            ));
            let scaled = _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
            let scaled = _mm256_blendv_ps(scaled, _mm256_mul_ps(scaled, k(2.0)), top);
            let out = _mm256_blendv_ps(
                scaled,
                k(0.0),
                _mm256_cmp_ps::<_CMP_LT_OQ>(x, k(super::EXP_MIN)),
            );
            let out = _mm256_blendv_ps(
                out,
                k(f32::INFINITY),
                _mm256_cmp_ps::<_CMP_GT_OQ>(x, k(super::EXP_MAX)),
            );
            let out = _mm256_blendv_ps(out, x, _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x));
            _mm256_storeu_ps(p, out);
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place between two positive normal floats.
    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_two_ulp_over_its_normal_range_and_saturates_outside() {
        let mut worst = 0;
        let steps = 2_000_000;
        for i in 0..=steps {
            let x = EXP_MIN + (EXP_MAX - EXP_MIN) * i as f32 / steps as f32;
            let exact = (x as f64).exp() as f32;
            if exact.is_normal() {
                worst = worst.max(ulps(exp(x), exact));
            }
        }
        assert!(worst <= 2, "worst error {worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn the_vector_path_equals_the_scalar_one_bit_for_bit() {
        let mut x: Vec<f32> = (0..100_003)
            .map(|i| -100.0 + 200.0 * i as f32 / 100_003.0)
            .collect();
        x.extend([
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            EXP_MIN,
            EXP_MAX,
            -0.0,
            88.5,
        ]);
        for (a, b) in [(1.0, 0.0), (0.125, -3.5), (-1.0, 0.0)] {
            let mut v = x.clone();
            map_exp(&mut v, a, b);
            for (got, &x) in v.iter().zip(&x) {
                let want = exp(x * a + b);
                assert!(
                    got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                    "exp({x} * {a} + {b}): {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn softmax_matches_the_f64_definition() {
        for len in [1usize, 7, 8, 9, 64, 301] {
            let v: Vec<f32> = (0..len)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.3)
                .collect();
            let scale = 0.125;
            let mut ours = v.clone();
            softmax(&mut ours, scale);
            let m = v
                .iter()
                .fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64 * scale as f64));
            let e: Vec<f64> = v
                .iter()
                .map(|&x| (x as f64 * scale as f64 - m).exp())
                .collect();
            let sum: f64 = e.iter().sum();
            for (o, e) in ours.iter().zip(&e) {
                assert!(
                    ((*o as f64) - e / sum).abs() <= 1e-6 * (e / sum) + 1e-12,
                    "{len}"
                );
            }
        }
    }
}
