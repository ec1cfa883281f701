//! The KL pass: end-to-end sensitivity of each linear layer in each format. For every layer
//! `l` and format `f` (a *variant*), the model runs with only `l` fake-quantized to `f`
//! (weights only; with `activations`, also weights and activations both in `f`, the W+A
//! variant) on held-out windows, and the mean KL divergence of its next-token distribution
//! from the full-precision one is recorded. Exact: every variant is a complete forward pass;
//! nothing is approximated.
//!
//! What makes it fast, stage by stage (a stage is a decoder block, or the head: final norm and
//! lm_head), streaming weights like the eps pass:
//! - a first sweep computes the full-precision residual stream at every stage boundary and
//!   the reference next-token distributions ([`NextTokenReference`]), once per window;
//! - a variant's forward starts at its own stage from the cached boundary (the stages before
//!   it are the reference's), with the variant's weights swapped in for that stage only;
//! - after its own stage a variant is a residual stream through full-precision stages, so all
//!   live streams cross a stage as one batch ([`Run`] takes stacked streams): each stage's
//!   weights are loaded once per sweep and multiplied into thousands of rows at a time.
//!
//! Memory, with `W` windows of `T` tokens, hidden size `H`, vocabulary `V` and `L` blocks:
//! `4 W T ((L + 1) H + V)` bytes of reference state, at most [`STREAM_BYTES`] of live
//! streams (variants beyond it run in further sweeps), one stage's FP32 weights plus one
//! quantized copy, and the activations of one batch of [`BATCH_ROWS`] rows (the head's logits:
//! [`HEAD_BYTES`]).

use std::collections::BTreeMap;

use crate::error::Result;
use crate::eval::kl::NextTokenReference;
use crate::formats::Format;
use crate::ir::{Graph, NodeId};
use crate::lower::LinearPrecision;
use crate::model::WeightSource;
use crate::runtime::cpu::Mat;

use super::forwards::StageForwards;
use super::{embed_windows, LayerCalibration};

/// Bytes of live residual streams one sweep holds.
pub const STREAM_BYTES: usize = 1 << 30;
/// Rows of stacked streams per batch through a block.
pub const BATCH_ROWS: usize = 4096;
/// Bytes of logits per batch through the head.
pub const HEAD_BYTES: usize = 256 << 20;

/// One (layer, format) the pass measures, on one window.
struct Stream {
    variant: usize,
    window: usize,
}

struct Variant {
    record: usize,
    node: NodeId,
    precision: LinearPrecision,
    stage: usize,
}

/// The full-precision state of the windows: the residual stream entering every stage (the
/// head's is the last block's output) and the next-token distributions.
struct Reference {
    stage_inputs: Vec<Vec<Mat>>,
    next: Vec<NextTokenReference>,
}

fn reference(
    graph: &Graph,
    weights: &dyn WeightSource,
    windows: &[&[u32]],
    forwards: &mut dyn StageForwards,
) -> Result<Reference> {
    let layers = graph.spec().num_layers;
    let mut x = embed_windows(graph, weights, windows)?;
    let mut stage_inputs = vec![Vec::with_capacity(layers + 1); windows.len()];
    let mut next = Vec::with_capacity(windows.len());
    for stage in 0..=layers {
        let mut model = forwards.load(graph, weights, stage)?;
        for (w, window) in windows.iter().enumerate() {
            stage_inputs[w].push(x[w].clone());
            let out = model.run(window, x[w].clone(), None, None)?;
            if stage < layers {
                x[w] = out;
            } else {
                next.push(NextTokenReference::new(&out, window));
            }
        }
    }
    Ok(Reference { stage_inputs, next })
}

/// Stacks streams of equally many rows into one matrix.
fn stack(xs: Vec<Mat>) -> Mat {
    let cols = xs[0].cols;
    let rows = xs.iter().map(|x| x.rows).sum();
    let mut data = Vec::with_capacity(rows * cols);
    for x in xs {
        data.extend_from_slice(&x.data);
    }
    Mat::from_vec(rows, cols, data)
}

/// Splits stacked streams of `seq` rows each.
fn unstack(x: Mat, seq: usize) -> Vec<Mat> {
    x.data
        .chunks(seq * x.cols)
        .map(|c| Mat::from_vec(seq, x.cols, c.to_vec()))
        .collect()
}

/// The precisions the pass measures a layer in: every format weight-only, and with
/// `activations` every quantized one again with its activations quantized (the W+A variant).
pub fn variant_precisions(formats: &[Format], activations: bool) -> Vec<LinearPrecision> {
    let weight_only = formats.iter().map(|&f| LinearPrecision::weight_only(f));
    let wa = formats
        .iter()
        .filter(|&&f| activations && f != Format::Fp16)
        .map(|&f| LinearPrecision::both(f));
    weight_only.chain(wa).collect()
}

/// Fills `kl` of every record for every format it has (and `kl_wa` for every quantized one
/// with `activations`), streaming the model's weights stage by stage, its forwards on
/// `forwards`. `progress(done, total)` counts stage crossings of (variant, window) streams.
pub fn measure_kl(
    graph: &Graph,
    weights: &dyn WeightSource,
    windows: &[&[u32]],
    records: &mut [LayerCalibration],
    activations: bool,
    forwards: &mut dyn StageForwards,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<()> {
    let layers = graph.spec().num_layers;
    let mut variants = Vec::new();
    for (r, record) in records.iter().enumerate() {
        let node = graph
            .find(&record.name)
            .expect("calibration records name graph nodes");
        let formats: Vec<Format> = record.metrics.keys().copied().collect();
        for precision in variant_precisions(&formats, activations) {
            variants.push(Variant {
                record: r,
                node,
                precision,
                stage: record.layer,
            });
        }
    }
    variants.sort_by_key(|v| v.stage);
    let streams: Vec<Stream> = (0..variants.len())
        .flat_map(|variant| (0..windows.len()).map(move |window| Stream { variant, window }))
        .collect();
    let total: usize = streams
        .iter()
        .map(|s| layers + 1 - variants[s.variant].stage)
        .sum::<usize>()
        + (layers + 1) * windows.len();
    let mut done = 0;
    let reference = reference(graph, weights, windows, forwards)?;
    done += (layers + 1) * windows.len();
    progress(done, total);

    let seq = windows[0].len();
    let stream_bytes = seq * graph.spec().hidden_size * 4;
    let per_sweep = (STREAM_BYTES / stream_bytes).max(1);
    let mut kl = vec![0.0f64; variants.len()];
    for sweep in streams.chunks(per_sweep) {
        let first = variants[sweep[0].variant].stage;
        // Streams that have crossed their own stage, with their residual stream.
        let mut live: Vec<(&Stream, Mat)> = Vec::new();
        for stage in first..=layers {
            let mut model = forwards.load(graph, weights, stage)?;
            let head = stage == layers;
            // Live streams cross this full-precision stage in batches (their tokens matter
            // only through their positions, which every window shares).
            let streams_per_batch = if head {
                HEAD_BYTES / (seq * graph.spec().vocab_size * 4)
            } else {
                BATCH_ROWS / seq
            }
            .max(1);
            let mut crossed = Vec::with_capacity(live.len());
            let mut pending = live.into_iter();
            loop {
                let (ids, xs): (Vec<&Stream>, Vec<Mat>) =
                    pending.by_ref().take(streams_per_batch).unzip();
                if ids.is_empty() {
                    break;
                }
                let out = model.run(windows[0], stack(xs), None, None)?;
                done += ids.len();
                for (s, x) in ids.into_iter().zip(unstack(out, seq)) {
                    if head {
                        kl[s.variant] += reference.next[s.window].kl_sum(&x);
                    } else {
                        crossed.push((s, x));
                    }
                }
                progress(done, total);
            }
            live = crossed;
            // Streams whose own layer is in this stage start here, from the reference.
            for s in sweep.iter().filter(|s| variants[s.variant].stage == stage) {
                let v = &variants[s.variant];
                let out = model.run(
                    windows[s.window],
                    reference.stage_inputs[s.window][stage].clone(),
                    Some((v.node, v.precision)),
                    None,
                )?;
                if head {
                    kl[s.variant] += reference.next[s.window].kl_sum(&out);
                } else {
                    live.push((s, out));
                }
                done += 1;
                progress(done, total);
            }
        }
    }
    let predictions: usize = reference.next.iter().map(|r| r.predictions()).sum();
    let by_variant: BTreeMap<(usize, LinearPrecision), f64> = variants
        .iter()
        .zip(&kl)
        .map(|(v, &k)| ((v.record, v.precision), k / predictions as f64))
        .collect();
    for ((record, precision), value) in by_variant {
        if let Some(m) = records[record].metrics.get_mut(&precision.weights) {
            match precision.activations {
                None => m.kl = Some(value),
                Some(_) => m.kl_wa = Some(value),
            }
        }
    }
    Ok(())
}
