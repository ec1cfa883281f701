//! The CPU linear-layer product at SmolLM2's prefill shapes (512 rows), side by side: the
//! SIMD kernel (AVX-512 or AVX2) over packed weights (`LinearWeights::with_panels`, what `CpuModel::load`
//! runs) and the general `matrixmultiply` path (what runs without either and for streamed
//! calibration stages). Prints GFLOP/s per shape as JSON lines; `scripts/bench_linear_torch.py`
//! times `torch.nn.functional.linear` (MKL) at the same shapes. `make bench-linear` runs both.
//! Under `cargo test` (`--bench` absent) each shape runs once at 16 rows, so the code is tested.

use std::sync::Arc;
use std::time::Instant;

use fpx::runtime::cpu::{LinearWeights, Mat};

/// (rows, in, out): q/o, k/v, gate/up, down, lm_head.
const SHAPES: [(usize, usize, usize); 5] = [
    (512, 576, 576),
    (512, 576, 192),
    (512, 576, 1536),
    (512, 1536, 576),
    (512, 576, 49152),
];

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    for (m, k, n) in SHAPES {
        let m = if bench { m } else { 16 };
        let x = Mat::from_vec(
            m,
            k,
            (0..m * k).map(|i| ((i % 13) as f32 - 6.0) * 0.01).collect(),
        );
        let w: Vec<f32> = (0..n * k).map(|i| ((i % 7) as f32 - 3.0) * 0.01).collect();
        let plain = LinearWeights::new(Arc::new(w), None, None);
        let packed = plain.clone().with_panels(n);
        let mut gflops = Vec::new();
        for lw in [&packed, &plain] {
            let first = lw.apply(n, &x);
            let reps = if bench {
                (2e10 / (2.0 * (m * k * n) as f64)).max(3.0) as usize
            } else {
                1
            };
            let t = Instant::now();
            for _ in 0..reps {
                std::hint::black_box(lw.apply(n, &x));
            }
            let s = t.elapsed().as_secs_f64() / reps as f64;
            gflops.push(2.0 * (m * k * n) as f64 / s / 1e9);
            let max_diff = first
                .data
                .iter()
                .zip(&plain.apply(n, &x).data)
                .fold(0f32, |a, (p, q)| a.max((p - q).abs()));
            assert!(max_diff < 1e-4, "{m}x{k}x{n}: kernels differ by {max_diff}");
        }
        println!(
            "{{\"shape\": [{m}, {k}, {n}], \"threads\": {}, \"packed_gflops\": {:.1}, \"matrixmultiply_gflops\": {:.1}}}",
            rayon::current_num_threads(),
            gflops[0],
            gflops[1]
        );
    }
}
