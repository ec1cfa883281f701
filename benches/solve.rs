//! Solve time of greedy-gamma and the ILP for 200, 2 000 and 10 000 layer-format choices.
//!
//! Instances look like real ones: SmolLM2-shaped layers (q, k, v, o, gate, up, down of
//! hidden 576 / FFN 1536) repeated, H100 roofline latencies at batch 1, and pseudo-random
//! eps (fp8 ~0.01-0.03, nvfp4 ~0.05-0.15, mxfp4 ~1.3x nvfp4). Two menus: {fp8, nvfp4}
//! (choices = 2 x layers) and {fp16, fp8, nvfp4, mxfp4} (4 x layers). The ILP's latency
//! budget is the latency greedy reaches at gamma 0.5, as in a sweep.
//!
//! `cargo bench --bench solve`; results in docs/planner.md. The target is ILP < 1 s at 2 000
//! choices.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

use fpx::formats::Format;
use fpx::ir::LinearKind;
use fpx::latency::{Gpu, LatencyModel, LayerShape, Roofline};
use fpx::solve::{
    greedy, ilp, Constraints, GreedyOptions, GreedyRule, IlpOptions, Problem, Target,
};

const SHAPES: [(LinearKind, usize, usize); 7] = [
    (LinearKind::Q, 576, 576),
    (LinearKind::K, 192, 576),
    (LinearKind::V, 192, 576),
    (LinearKind::O, 576, 576),
    (LinearKind::Gate, 1536, 576),
    (LinearKind::Up, 1536, 576),
    (LinearKind::Down, 576, 1536),
];

fn instance(choices: usize, menu: &[Format]) -> Problem {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 11) as f64 / (1u64 << 53) as f64
    };
    let roofline = Roofline::new(Gpu::H100, 1, 512).expect("batch 1 is valid");
    let mut p = Problem {
        offsets: vec![0],
        ..Problem::default()
    };
    for i in 0..choices / menu.len() {
        let (kind, out, inp) = SHAPES[i % SHAPES.len()];
        let shape = LayerShape {
            name: format!("model.layers.{}.{}", i / 7, kind.name()),
            layer: i / 7,
            kind,
            out_features: out,
            in_features: inp,
        };
        let fp4 = 0.05 + 0.1 * next();
        p.names.push(shape.name.clone());
        p.groups.push(i as u32);
        for &f in menu {
            let eps = match f {
                Format::Fp16 => 0.0005 * next(),
                Format::Fp8 => 0.01 + 0.02 * next(),
                Format::Nvfp4 => fp4,
                Format::Mxfp4 => fp4 * (1.2 + 0.2 * next()),
            };
            let precision = fpx::lower::LinearPrecision::weight_only(f);
            p.precisions.push(precision);
            p.error.push(eps);
            p.eps.push(eps);
            p.latency.push(
                roofline
                    .latency(&shape, precision)
                    .expect("roofline covers all"),
            );
            p.bytes.push(f.weight_bytes(out, inp));
        }
        p.offsets.push(p.precisions.len());
    }
    p
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("solve");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(8));
    let menus: [(&str, &[Format]); 2] = [
        ("fp8+nvfp4", &[Format::Fp8, Format::Nvfp4]),
        (
            "4 formats",
            &[Format::Fp16, Format::Fp8, Format::Nvfp4, Format::Mxfp4],
        ),
    ];
    for (menu_name, menu) in menus {
        for choices in [200, 2_000, 10_000] {
            let p = instance(choices, menu);
            let opts = GreedyOptions::default();
            let g = greedy(&p, &opts, GreedyRule::Gamma(0.5), None).expect("greedy solves");
            let target = Target::Latency {
                seconds: g.solution.totals.latency,
            };
            let c = Constraints {
                target,
                memory: None,
            };
            let id = format!("{menu_name}/{choices}");
            group.bench_with_input(BenchmarkId::new("greedy", &id), &p, |b, p| {
                b.iter(|| {
                    greedy(black_box(p), &opts, GreedyRule::Gamma(0.5), None).expect("greedy")
                })
            });
            group.bench_with_input(BenchmarkId::new("ilp", &id), &p, |b, p| {
                b.iter(|| ilp(black_box(p), &c, &IlpOptions::default()).expect("ilp"))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
