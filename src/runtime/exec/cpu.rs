//! The cpu backend of an [`ExecutablePlan`]: runs the schedule's steps in Rust on the packed
//! weights, with the kernels' buffer layouts (activations `[m, cols]` row-major, a KV cache of
//! `[max_seq, kv_dim]` per layer) and the kernels' arithmetic (see `linear.rs`; RMSNorm with a
//! double accumulator; RoPE from the plan's tables; attention normalising probabilities before
//! the value product).

use rayon::prelude::*;

use super::generate::Backend;
use super::host::{HostBackend, HostState};
use super::linear::{argmax, linear_forward};
use super::ExecutablePlan;
use crate::error::{Error, Result};
use crate::lower::{Act, Step};

/// Activations and KV cache of one sequence on the CPU.
pub struct CpuBackend<'a> {
    plan: &'a ExecutablePlan,
    state: HostState,
}

impl<'a> CpuBackend<'a> {
    pub fn new(plan: &'a ExecutablePlan) -> CpuBackend<'a> {
        CpuBackend {
            plan,
            state: HostState::new(plan),
        }
    }

    fn buf(&mut self, act: Act) -> &mut Vec<f32> {
        &mut self.state.acts[act as usize]
    }

    /// The buffer of `act` moved out (so that another one can be borrowed mutably).
    fn take(&mut self, act: Act) -> Vec<f32> {
        std::mem::take(self.buf(act))
    }

    fn put(&mut self, act: Act, v: Vec<f32>) {
        self.state.acts[act as usize] = v;
    }

    fn step(&mut self, step: Step, tokens: &[u32], pos: usize) {
        let plan = self.plan;
        let d = &plan.schedule.dims;
        let m = tokens.len();
        match step {
            Step::Embed => {
                let x = self.buf(Act::X);
                for (r, &t) in tokens.iter().enumerate() {
                    let t = t as usize;
                    x[r * d.hidden..(r + 1) * d.hidden]
                        .copy_from_slice(&plan.embedding[t * d.hidden..(t + 1) * d.hidden]);
                }
            }
            Step::RmsNorm {
                norm,
                src,
                dst,
                last_row,
            } => {
                let x = self.take(src);
                let (first, rows) = if last_row { (m - 1, 1) } else { (0, m) };
                let y = self.buf(dst);
                let w = &plan.norms[norm];
                let h = d.hidden;
                y[..rows * h]
                    .par_chunks_mut(h)
                    .zip(x[first * h..(first + rows) * h].par_chunks(h))
                    .for_each(|(out, row)| rms_norm_row(row, w, d.eps, out));
                self.put(src, x);
            }
            Step::Linear { linear, src, dst } => {
                let slot = &plan.schedule.linears[linear];
                let rows = step.rows(m);
                let x = self.take(src);
                let y = self.buf(dst);
                linear_forward(&plan.linears[linear], &slot.shape, &x, rows, y);
                self.put(src, x);
            }
            Step::RopeKv { layer } => {
                let half = d.head_dim / 2;
                let rotate = |v: &mut [f32], p: usize| {
                    let (cos, sin) = (
                        &plan.rope_cos[p * half..(p + 1) * half],
                        &plan.rope_sin[p * half..(p + 1) * half],
                    );
                    for head in v.chunks_mut(d.head_dim) {
                        let (lo, hi) = head.split_at_mut(half);
                        for i in 0..half {
                            let (a, b) = (lo[i], hi[i]);
                            lo[i] = a * cos[i] - b * sin[i];
                            hi[i] = b * cos[i] + a * sin[i];
                        }
                    }
                };
                let q = self.buf(Act::Q);
                for r in 0..m {
                    rotate(&mut q[r * d.q_dim..(r + 1) * d.q_dim], pos + r);
                }
                let k = self.take(Act::K);
                let v = self.take(Act::V);
                let (kc, vc) = (
                    &mut self.state.k_cache[layer],
                    &mut self.state.v_cache[layer],
                );
                for r in 0..m {
                    let p = pos + r;
                    let dst = &mut kc[p * d.kv_dim..(p + 1) * d.kv_dim];
                    dst.copy_from_slice(&k[r * d.kv_dim..(r + 1) * d.kv_dim]);
                    rotate(dst, p);
                    vc[p * d.kv_dim..(p + 1) * d.kv_dim]
                        .copy_from_slice(&v[r * d.kv_dim..(r + 1) * d.kv_dim]);
                }
                self.put(Act::K, k);
                self.put(Act::V, v);
            }
            Step::Attention { layer } => {
                let q = self.take(Act::Q);
                let mut out = self.take(Act::Att);
                attention(
                    plan,
                    &q,
                    &self.state.k_cache[layer],
                    &self.state.v_cache[layer],
                    pos,
                    m,
                    &mut out,
                );
                self.put(Act::Q, q);
                self.put(Act::Att, out);
            }
            Step::SiluMul => {
                let up = self.take(Act::Up);
                let gate = self.buf(Act::Gate);
                gate[..m * d.ffn]
                    .par_iter_mut()
                    .zip(up[..m * d.ffn].par_iter())
                    .for_each(|(g, &u)| *g = *g / (1.0 + (-*g).exp()) * u);
                self.put(Act::Up, up);
            }
            Step::Argmax => {
                let logits = self.buf(Act::Logits);
                self.state.next = argmax(&logits[..d.vocab]) as i32;
            }
        }
    }
}

/// One row of RMSNorm, as the kernel: mean of squares in f64, `v * inv * w`.
fn rms_norm_row(row: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / row.len() as f64;
    let inv = (1.0 / (ms + eps as f64).sqrt()) as f32;
    for ((o, &v), &w) in out.iter_mut().zip(row).zip(w) {
        *o = v * inv * w;
    }
}

/// Causal GQA of `m` query rows at positions `pos..pos + m` over the cache.
fn attention(
    plan: &ExecutablePlan,
    q: &[f32],
    kc: &[f32],
    vc: &[f32],
    pos: usize,
    m: usize,
    out: &mut [f32],
) {
    let d = &plan.schedule.dims;
    let (hd, group) = (d.head_dim, d.heads / d.kv_heads);
    let scale = 1.0 / (hd as f32).sqrt();
    out[..m * d.q_dim]
        .par_chunks_mut(hd)
        .enumerate()
        .for_each(|(i, o)| {
            let (r, h) = (i / d.heads, i % d.heads);
            let g = h / group;
            let qh = &q[r * d.q_dim + h * hd..r * d.q_dim + (h + 1) * hd];
            let len = pos + r + 1;
            let mut sc: Vec<f32> = (0..len)
                .map(|j| {
                    let kr = &kc[j * d.kv_dim + g * hd..j * d.kv_dim + (g + 1) * hd];
                    qh.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>() * scale
                })
                .collect();
            let max = sc.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let mut sum = 0f32;
            for s in sc.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let inv = 1.0 / sum;
            o.fill(0.0);
            for (j, &s) in sc.iter().enumerate() {
                let p = s * inv;
                let vr = &vc[j * d.kv_dim + g * hd..j * d.kv_dim + (g + 1) * hd];
                for (a, &v) in o.iter_mut().zip(vr) {
                    *a += p * v;
                }
            }
        });
}

impl Backend for CpuBackend<'_> {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<u32> {
        check_pass(self.plan, tokens, pos)?;
        for &step in &self.plan.schedule.steps {
            self.step(step, tokens, pos);
        }
        Ok(self.state.next as u32)
    }

    fn logits(&mut self) -> Result<Vec<f32>> {
        let vocab = self.plan.schedule.dims.vocab;
        Ok(self.state.act(Act::Logits)[..vocab].to_vec())
    }
}

impl HostBackend for CpuBackend<'_> {
    fn state(&self) -> &HostState {
        &self.state
    }

    fn state_mut(&mut self) -> &mut HostState {
        &mut self.state
    }

    fn run_step(&mut self, index: usize, tokens: &[u32], pos: usize) -> Result<()> {
        let step = self.plan.schedule.steps[index];
        self.step(step, tokens, pos);
        Ok(())
    }
}

/// A pass of `tokens` at `pos` fits the plan: non-empty, inside the KV cache, valid ids.
pub(crate) fn check_pass(plan: &ExecutablePlan, tokens: &[u32], pos: usize) -> Result<()> {
    let vocab = plan.schedule.dims.vocab;
    if tokens.is_empty() {
        return Err(Error::invalid(
            "tokens",
            "a forward pass needs at least one token",
        ));
    }
    if pos + tokens.len() > plan.max_seq {
        return Err(Error::invalid(
            "sequence length",
            format!(
                "positions {pos}..{} exceed the plan's KV cache of {} (raise --max-seq)",
                pos + tokens.len(),
                plan.max_seq
            ),
        ));
    }
    if let Some(&t) = tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::invalid(
            "token id",
            format!("{t} is outside the vocabulary of {vocab}"),
        ));
    }
    Ok(())
}
