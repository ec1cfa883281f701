//! The cpu backend of an [`ExecutablePlan`]: runs the schedule's steps in Rust on the packed
//! weights, with the kernels' buffer layouts (activations `[m, cols]` row-major, a KV cache of
//! `[max_seq, kv_dim]` per layer). Its non-linear ops are the CPU reference's own
//! ([`crate::runtime::cpu::kernels`]: RMSNorm with a double accumulator, RoPE from the plan's
//! tables, attention over the KV cache normalising probabilities before the value product);
//! its linear layer decodes the packed bytes as the kernels do (`linear.rs`).

use super::generate::Backend;
use super::host::{HostBackend, HostState};
use super::linear::{argmax, linear_forward};
use super::ExecutablePlan;
use crate::error::{Error, Result};
use crate::lower::{Act, Step};
use crate::runtime::cpu::kernels;

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
                let h = d.hidden;
                let y = self.buf(dst);
                kernels::rms_norm_rows(
                    &x[first * h..(first + rows) * h],
                    h,
                    &plan.norms[norm],
                    d.eps,
                    &mut y[..rows * h],
                );
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
                let (cos, sin) = (&plan.rope_cos, &plan.rope_sin);
                let q = self.buf(Act::Q);
                kernels::rope_rows(&mut q[..m * d.q_dim], d.q_dim, d.head_dim, cos, sin, pos);
                let k = self.take(Act::K);
                let v = self.take(Act::V);
                let (kc, vc) = (
                    &mut self.state.k_cache[layer],
                    &mut self.state.v_cache[layer],
                );
                let span = pos * d.kv_dim..(pos + m) * d.kv_dim;
                kc[span.clone()].copy_from_slice(&k[..m * d.kv_dim]);
                kernels::rope_rows(&mut kc[span.clone()], d.kv_dim, d.head_dim, cos, sin, pos);
                vc[span].copy_from_slice(&v[..m * d.kv_dim]);
                self.put(Act::K, k);
                self.put(Act::V, v);
            }
            Step::Attention { layer } => {
                let q = self.take(Act::Q);
                let mut out = self.take(Act::Att);
                let shape = kernels::AttentionShape {
                    heads: d.heads,
                    kv_heads: d.kv_heads,
                    head_dim: d.head_dim,
                };
                kernels::attention_rows(
                    &q[..m * d.q_dim],
                    m,
                    &self.state.k_cache[layer],
                    &self.state.v_cache[layer],
                    pos,
                    shape,
                    &mut out[..m * d.q_dim],
                );
                self.put(Act::Q, q);
                self.put(Act::Att, out);
            }
            Step::SiluMul => {
                let up = self.take(Act::Up);
                let gate = self.buf(Act::Gate);
                kernels::silu_mul_in_place(&mut gate[..m * d.ffn], &up[..m * d.ffn]);
                self.put(Act::Up, up);
            }
            Step::Argmax => {
                let logits = self.buf(Act::Logits);
                self.state.next = argmax(&logits[..d.vocab]) as i32;
            }
        }
    }
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
