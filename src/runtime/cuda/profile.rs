//! Latency profiling on the GPU (`fpx profile`): the time of each linear layer's decode
//! kernel in each format, and of the rest of a decode step.
//!
//! Each distinct (shape, format) is timed once and reported for every layer of that shape.
//! Weights are random values packed in the format; enough copies are uploaded to exceed the
//! L2 cache several times over, for every layer size (up to 4096 copies), and consecutive
//! launches rotate through them, so no launch finds its weights in cache (a decode step
//! streams every layer from HBM once). After `warmup` launches, each of `repeats` samples
//! times a batch of [`BATCH`] launches with one pair of CUDA events (microsecond kernels are
//! of the order of an event pair's own resolution); every sample's mean launch is returned,
//! and [`crate::latency::measured::record`] makes the profile's medians and distributions of
//! them. The rest of the step (embedding, norms, RoPE, attention over `context` cached
//! positions, SiLU, argmax) is sampled inside real decode steps of the model.

use std::collections::BTreeMap;

use super::backend::{CudaBackend, Device};
use super::compile::CompilerOptions;
use crate::error::{Error, Result};
use crate::lower::{KernelSpec, LinearShape, Schedule, WeightFormat};
use crate::runtime::exec::{Backend, ExecutablePlan, PackedLinear};
use crate::runtime::launch::{linear_args, Launcher, LinearBuffers, LinearInput, Memory};

/// What to measure.
#[derive(Debug, Clone)]
pub struct ProfileOptions {
    pub formats: Vec<WeightFormat>,
    /// Activation rows per launch (1..=8: the decode GEMV).
    pub batch: usize,
    pub warmup: usize,
    pub repeats: usize,
    /// Bytes of weight copies to rotate through (several times the L2 size).
    pub rotate_bytes: usize,
    pub compiler: CompilerOptions,
}

/// `[n, k]` weights to time a kernel on: uniform in [-0.05, 0.05) from a fixed xorshift
/// stream (timing needs no statistics beyond a plausible spread of values).
pub fn timing_weights(n: usize, k: usize) -> Vec<f32> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..n * k)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
        })
        .collect()
}

/// Launches per timed sample.
pub const BATCH: usize = 10;

/// Seconds of one launch per sample, per (shape, format).
pub type ShapeSamples = BTreeMap<(LinearShape, WeightFormat), Vec<f64>>;

/// Times the decode linear of every distinct shape of `schedule` in every format.
pub fn profile_linears(
    dev: &mut Device,
    schedule: &Schedule,
    opts: &ProfileOptions,
) -> Result<ShapeSamples> {
    if opts.batch == 0 || opts.batch > crate::lower::GEMV_MAX_ROWS {
        return Err(Error::invalid(
            "batch",
            format!("{} (the decode GEMV takes 1..=8 rows)", opts.batch),
        ));
    }
    let mut shapes: Vec<(LinearShape, WeightFormat)> = Vec::new();
    for l in &schedule.linears {
        for &f in &opts.formats {
            let s = LinearShape {
                format: f,
                ..l.shape
            };
            if !shapes.contains(&(s, f)) {
                shapes.push((s, f));
            }
        }
    }
    shapes.sort();
    let specs: Vec<KernelSpec> = shapes.iter().map(|(s, _)| KernelSpec::Gemv(*s)).collect();
    dev.load_kernels(&specs, opts.compiler.clone())?;
    let mut out = ShapeSamples::new();
    for (shape, format) in shapes {
        let (n, k) = (shape.n, shape.k);
        let w = timing_weights(n, k);
        let bias = shape.bias.then(|| vec![0.01f32; n]);
        let packed = PackedLinear::pack(format, &w, n, k, bias, None);
        let rotate = opts.rotate_bytes.max(4 * dev.l2_bytes()?);
        let copies = rotate.div_ceil(packed.weight_bytes().max(1)).clamp(2, 4096);
        let dev_copies = (0..copies)
            .map(|_| LinearBuffers::upload(&*dev, &packed))
            .collect::<Result<Vec<_>>>()?;
        let x = dev.upload(&shape.act.encode(&vec![0.5f32; opts.batch * k]))?;
        let y = dev.zeros(opts.batch * n * shape.act.bytes())?;
        let (spec, entry) = shape.kernel_for_rows(opts.batch);
        let launch = |i: usize| {
            let args = linear_args(
                &dev_copies[i % copies],
                LinearInput::Act(&x),
                &y,
                opts.batch,
            );
            // SAFETY: x and y hold `batch` rows of the layer's k and n activations.
            unsafe { dev.launch(&spec, &entry, opts.batch, 0, &args) }
        };
        for i in 0..opts.warmup {
            launch(i)?;
        }
        let mut times = Vec::with_capacity(opts.repeats);
        let mut next = opts.warmup;
        for _ in 0..opts.repeats {
            let t = dev.time_launches(BATCH, |i| launch(next + i))?;
            next += BATCH;
            times.push(t / BATCH as f64);
        }
        out.insert((shape, format), times);
    }
    Ok(out)
}

/// Seconds of the non-linear part of a decode step at `context` cached positions, one per
/// sample: the whole step timed with CUDA events minus its linear layers, each timed in place.
pub fn profile_rest(
    plan: &ExecutablePlan,
    ordinal: usize,
    context: usize,
    opts: &ProfileOptions,
) -> Result<Vec<f64>> {
    if context + 1 > plan.max_seq {
        return Err(Error::invalid(
            "context",
            format!("{context} exceeds the plan's {} positions", plan.max_seq),
        ));
    }
    let mut backend = CudaBackend::new(plan, ordinal, Some(opts.compiler.clone()))?;
    backend.launcher.use_graph = false;
    let prompt = vec![0u32; context.max(1)];
    backend.forward(&prompt, 0)?;
    let mut rest = Vec::with_capacity(opts.repeats);
    for i in 0..opts.warmup + opts.repeats {
        let (whole, linears) = backend.timed_decode_step(context.max(1))?;
        if i >= opts.warmup {
            rest.push((whole - linears).max(0.0));
        }
    }
    Ok(rest)
}
