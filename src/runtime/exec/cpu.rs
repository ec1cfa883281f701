//! The cpu backend of an [`ExecutablePlan`]: runs the schedule's steps in Rust with the kernels'
//! buffer layouts and element type (a [`HostState`]: activations `[m, cols]` row-major and a
//! KV cache of `[max_seq, kv_dim]` per layer, in the schedule's activation type). Every op is
//! the CPU interpreter's own ([`crate::runtime::cpu::kernels`] and [`LinearWeights::apply`] on
//! the FP32 weights the packed bytes decode to): each step widens its inputs to FP32,
//! computes in FP32 and rounds once when it stores, the rule every kernel follows. A MoE block
//! is the interpreter's routing, experts and combine (`runtime::cpu::moe`), which round where
//! the kernels' six launches store.

use super::generate::Backend;
use super::host::{HostBackend, HostBuf, HostState};
use super::{ExecutablePlan, PackedLinear};
use crate::error::{Error, Result};
use crate::formats::{fp8, Format};
use crate::lower::{Act, ActDtype, LinearShape, Step};
use crate::runtime::cpu::{kernels, moe};
use crate::runtime::cpu::{LinearWeights, Mat};

/// Activations and KV cache of one sequence on the CPU.
pub struct CpuBackend<'a> {
    plan: &'a ExecutablePlan,
    /// Each linear layer's decoded weights.
    linears: Vec<LinearWeights>,
    state: HostState,
}

/// Stores `v` (rounded to `act`) at element `at` of `buf`.
fn write(buf: &mut HostBuf, act: ActDtype, at: usize, v: &[f32]) {
    let e = act.bytes();
    buf.bytes_mut()[at * e..(at + v.len()) * e].copy_from_slice(&act.encode(v));
}

/// Quantizes rows of `cols` values (as stored) into the FP8 buffers with the CPU reference's
/// per-row quantizer, as a quantizing kernel leaves them.
fn quantize_fp8(st: &mut HostState, x: &[f32], cols: usize) {
    let (codes, scales) = fp8::quantize_rows(x, x.len() / cols, cols);
    st.x_codes.bytes_mut()[..codes.len()].copy_from_slice(&codes);
    write(&mut st.x_scales, ActDtype::F32, 0, &scales);
}

/// The weights a packed layer decodes to, as the CPU interpreter applies them.
fn decoded(p: &PackedLinear, shape: &LinearShape) -> LinearWeights {
    LinearWeights::new(
        std::sync::Arc::new(p.dequantize(shape.n, shape.k)),
        p.bias.clone().map(std::sync::Arc::new),
        None,
    )
}

/// The cpu backend's linear step on values: `y (+)= x W^T + b` over `rows` rows of `x`
/// (`[rows, k]`, already in the activation type), `y` (`[rows, n]`) rounded as stored.
fn linear_rows(w: &LinearWeights, shape: &LinearShape, x: Vec<f32>, rows: usize, y: &mut [f32]) {
    let out = w.apply(shape.n, &Mat::from_vec(rows, shape.k, x)).data;
    for (d, v) in y.iter_mut().zip(out) {
        *d = shape.act.round(if shape.accumulate { *d + v } else { v });
    }
}

/// One linear layer as the cpu backend runs it, on standalone buffers: `x` (`[rows, k]`) and
/// `y_init` (`[rows, n]`, the output before the step) rounded to the layer's activation type
/// on the way in, as a kernel's inputs would be (and `x` quantized per row for W8A8); returns
/// `y` after the step. The reference the generated linear kernels are checked against.
pub fn reference_linear(
    packed: &PackedLinear,
    shape: &LinearShape,
    x: &[f32],
    rows: usize,
    y_init: &[f32],
) -> Vec<f32> {
    let round = |v: &[f32]| v.iter().map(|&v| shape.act.round(v)).collect::<Vec<f32>>();
    let mut y = round(&y_init[..rows * shape.n]);
    let mut x = round(&x[..rows * shape.k]);
    if shape.w8a8 {
        Format::Fp8.fake_quantize_activations(&mut x, rows, shape.k);
    }
    linear_rows(&decoded(packed, shape), shape, x, rows, &mut y);
    y
}

impl<'a> CpuBackend<'a> {
    pub fn new(plan: &'a ExecutablePlan) -> CpuBackend<'a> {
        let linears = plan
            .linears
            .iter()
            .zip(&plan.schedule.linears)
            .map(|(p, slot)| decoded(p, &slot.shape))
            .collect();
        CpuBackend {
            plan,
            linears,
            state: HostState::new(plan),
        }
    }

    fn step(&mut self, step: Step, tokens: &[u32], pos: usize) -> Result<()> {
        let plan = self.plan;
        let s = &plan.schedule;
        let (d, act) = (&s.dims, s.act);
        let m = tokens.len();
        let st = &mut self.state;
        let buf = |a: Act| a as usize;
        match step {
            Step::Embed => {
                let x = kernels::embed(&plan.embedding, d.vocab, d.hidden, tokens)?;
                write(&mut st.acts[buf(Act::X)], act, 0, &x.data);
            }
            Step::RmsNorm {
                norm,
                src,
                dst,
                last_row,
                quant,
            } => {
                let h = d.hidden;
                let (first, rows) = if last_row { (m - 1, 1) } else { (0, m) };
                let x = HostState::values(&st.acts[buf(src)], act, (first + rows) * h);
                let mut y = vec![0f32; rows * h];
                kernels::rms_norm_rows(&x[first * h..], h, &plan.norms[norm], d.eps, &mut y);
                write(&mut st.acts[buf(dst)], act, 0, &y);
                if quant {
                    quantize_fp8(st, &HostState::values(&st.acts[buf(dst)], act, rows * h), h);
                }
            }
            Step::QuantFp8 { src } => {
                let cols = s.act_cols(src);
                quantize_fp8(
                    st,
                    &HostState::values(&st.acts[buf(src)], act, m * cols),
                    cols,
                );
            }
            Step::Linear {
                linear,
                src,
                dst,
                w8a8,
            } => {
                let shape = s.linears[linear].shape;
                let rows = step.rows(m);
                let x = if w8a8 {
                    st.fp8_values(rows, shape.k)
                } else {
                    HostState::values(&st.acts[buf(src)], act, rows * shape.k)
                };
                let mut y = HostState::values(&st.acts[buf(dst)], act, rows * shape.n);
                linear_rows(&self.linears[linear], &shape, x, rows, &mut y);
                write(&mut st.acts[buf(dst)], act, 0, &y);
            }
            Step::RopeKv { layer, qk_norm } => {
                let (cos, sin) = (&plan.rope_cos, &plan.rope_sin);
                let norm = |slot: usize| (plan.norms[slot].as_slice(), d.eps);
                let (q_norm, k_norm) = match qk_norm {
                    Some(n) => (Some(norm(n.q)), Some(norm(n.k))),
                    None => (None, None),
                };
                let mut q = HostState::values(&st.acts[buf(Act::Q)], act, m * d.q_dim);
                kernels::norm_rope_rows(&mut q, d.q_dim, d.head_dim, q_norm, cos, sin, pos);
                write(&mut st.acts[buf(Act::Q)], act, 0, &q);
                let mut k = HostState::values(&st.acts[buf(Act::K)], act, m * d.kv_dim);
                kernels::norm_rope_rows(&mut k, d.kv_dim, d.head_dim, k_norm, cos, sin, pos);
                let v = HostState::values(&st.acts[buf(Act::V)], act, m * d.kv_dim);
                write(&mut st.k_cache[layer], act, pos * d.kv_dim, &k);
                write(&mut st.v_cache[layer], act, pos * d.kv_dim, &v);
            }
            Step::Attention { layer, window } => {
                let q = HostState::values(&st.acts[buf(Act::Q)], act, m * d.q_dim);
                let k = HostState::values(&st.k_cache[layer], act, (pos + m) * d.kv_dim);
                let v = HostState::values(&st.v_cache[layer], act, (pos + m) * d.kv_dim);
                let shape = kernels::AttentionShape {
                    heads: d.heads,
                    kv_heads: d.kv_heads,
                    head_dim: d.head_dim,
                    window,
                };
                let mut out = vec![0f32; m * d.q_dim];
                kernels::attention_rows(&q, m, &k, &v, pos, shape, &mut out);
                write(&mut st.acts[buf(Act::Att)], act, 0, &out);
            }
            Step::SiluMul { quant } => {
                let mut gate = HostState::values(&st.acts[buf(Act::Gate)], act, m * d.ffn);
                let up = HostState::values(&st.acts[buf(Act::Up)], act, m * d.ffn);
                kernels::silu_mul_in_place(&mut gate, &up);
                write(&mut st.acts[buf(Act::Gate)], act, 0, &gate);
                if quant {
                    // The stored (rounded) rows, as the kernel quantizes them.
                    let gate = HostState::values(&st.acts[buf(Act::Gate)], act, m * d.ffn);
                    quantize_fp8(st, &gate, d.ffn);
                }
            }
            Step::Moe { moe } => {
                let slot = &s.moes[moe];
                let rows = |b: &HostBuf| {
                    Mat::from_vec(m, d.hidden, HostState::values(b, act, m * d.hidden))
                };
                let x = rows(&st.acts[buf(slot.src)]);
                let mut acc = rows(&st.acts[buf(slot.dst)]);
                let linears = &self.linears;
                let routing =
                    moe::block_forward(&x, &plan.routers[moe], slot, act, &mut acc, |e, p, xe| {
                        let l = slot.experts[e][p];
                        Ok(linears[l].apply(s.linears[l].shape.n, xe))
                    })?;
                write(&mut st.acts[buf(slot.dst)], act, 0, &acc.data);
                // The routing as the kernels leave it in their buffers.
                let ids: Vec<u8> = (routing.experts.iter())
                    .flat_map(|&e| (e as i32).to_le_bytes())
                    .collect();
                st.route_ids.bytes_mut()[..ids.len()].copy_from_slice(&ids);
                write(&mut st.route_weights, ActDtype::F32, 0, &routing.weights);
            }
            Step::Argmax => {
                let logits = HostState::values(&st.acts[buf(Act::Logits)], act, d.vocab);
                let next = kernels::argmax(&logits) as i32;
                st.next.bytes_mut()[..4].copy_from_slice(&next.to_le_bytes());
            }
        }
        Ok(())
    }
}

impl Backend for CpuBackend<'_> {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<u32> {
        check_pass(self.plan, tokens, pos)?;
        for &step in &self.plan.schedule.steps {
            self.step(step, tokens, pos)?;
        }
        Ok(self.state.next() as u32)
    }

    fn logits(&mut self) -> Result<Vec<f32>> {
        let s = &self.plan.schedule;
        Ok(HostState::values(
            &self.state.acts[Act::Logits as usize],
            s.act,
            s.dims.vocab,
        ))
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
        self.step(step, tokens, pos)
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
