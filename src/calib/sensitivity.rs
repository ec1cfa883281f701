//! The KL pass: end-to-end sensitivity of each linear layer in each format. For every layer
//! `l` and format `f`, the model runs with only `l` fake-quantized to `f` (weights only) on
//! held-out windows, and the mean KL divergence of its next-token distribution from the
//! full-precision one is recorded.
//!
//! Only the blocks from `l` on change, so each such forward starts at `l`'s block from the
//! cached full-precision residual stream. Memory: the whole model in FP32, plus per window the
//! residual stream at every block boundary and the reference log-probabilities.

use rayon::prelude::*;

use crate::error::Result;
use crate::eval::log_softmax;
use crate::formats::Format;
use crate::ir::{Graph, Op};
use crate::lower::LinearPrecision;
use crate::runtime::cpu::{CpuModel, Mat, Run};

use super::LayerCalibration;

/// Full-precision state of one held-out window.
struct Reference<'w> {
    tokens: &'w [u32],
    /// Residual stream entering each block, then the head (final norm and lm_head).
    block_inputs: Vec<Mat>,
    /// Log-probabilities of the next token at every position but the last.
    log_probs: Vec<Vec<f32>>,
}

fn reference<'w>(model: &CpuModel, tokens: &'w [u32]) -> Result<Reference<'w>> {
    let g = model.graph();
    let mut block_inputs = Vec::with_capacity(g.spec().num_layers);
    let mut x = model.execute(
        tokens,
        Run {
            until: g.block_input(0),
            ..Run::default()
        },
        &mut |_, _, _| {},
    )?;
    for layer in 0..g.spec().num_layers {
        block_inputs.push(x.clone());
        let run = Run {
            from: Some((g.block_input(layer).expect("block input"), x)),
            until: g.block_output(layer),
            replace: None,
        };
        x = model.execute(tokens, run, &mut |_, _, _| {})?;
    }
    // The head stage (final norm, lm_head) restarts from the last block's output.
    block_inputs.push(x.clone());
    let last = g.spec().num_layers - 1;
    let run = Run {
        from: Some((g.block_output(last).expect("block output"), x)),
        ..Run::default()
    };
    let logits = model.execute(tokens, run, &mut |_, _, _| {})?;
    let log_probs = (0..logits.rows - 1)
        .into_par_iter()
        .map(|i| {
            log_softmax(logits.row(i))
                .into_iter()
                .map(|v| v as f32)
                .collect()
        })
        .collect();
    Ok(Reference {
        tokens,
        block_inputs,
        log_probs,
    })
}

/// Sum over positions of `KL(reference || softmax(logits))`.
fn kl_sum(reference: &[Vec<f32>], logits: &Mat) -> f64 {
    reference
        .par_iter()
        .enumerate()
        .map(|(i, lp)| {
            let lq = log_softmax(logits.row(i));
            lp.iter()
                .zip(&lq)
                .map(|(&p, &q)| (p as f64).exp() * (p as f64 - q))
                .sum::<f64>()
        })
        .sum()
}

/// Fills `kl` of every record for every format it has. `model` must hold all weights at full
/// precision. `progress(done, total)` is called after each (layer, format).
pub fn measure_kl(
    model: &CpuModel,
    windows: &[&[u32]],
    records: &mut [LayerCalibration],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<()> {
    let g: &Graph = model.graph();
    let refs: Vec<Reference> = windows
        .iter()
        .map(|w| reference(model, w))
        .collect::<Result<_>>()?;
    let predictions: usize = refs.iter().map(|r| r.log_probs.len()).sum();
    let total: usize = records.iter().map(|r| r.metrics.len()).sum();
    let mut done = 0;
    for record in records.iter_mut() {
        let id = g
            .find(&record.name)
            .expect("calibration records name graph nodes");
        let Op::Linear(l) = &g.node(id).op else {
            unreachable!("records are linear layers")
        };
        let full = model.linear(id).expect("the whole model is loaded");
        let formats: Vec<Format> = record.metrics.keys().copied().collect();
        for f in formats {
            let w = full.quantized(l, LinearPrecision::weight_only(f));
            let mut kl = 0.0;
            for r in &refs {
                let run = Run {
                    from: Some((
                        g.block_input(record.layer).expect("block input"),
                        r.block_inputs[record.layer].clone(),
                    )),
                    until: None,
                    replace: Some((id, &w)),
                };
                let logits = model.execute(r.tokens, run, &mut |_, _, _| {})?;
                kl += kl_sum(&r.log_probs, &logits);
            }
            if let Some(m) = record.metrics.get_mut(&f) {
                m.kl = Some(kl / predictions as f64);
            }
            done += 1;
            progress(done, total);
        }
    }
    Ok(())
}
