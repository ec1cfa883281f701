//! The CPU reference forward: an interpreter of the plan's [`Schedule`] (the same lowering the
//! kernels are generated from and every backend runs) over a window of tokens, with each
//! step's op implemented once in [`kernels`] (products in [`mat`], `e^x` and softmax in
//! [`vmath`]). It computes in FP32 and, with
//! [`CpuModel::with_act`], rounds every activation buffer and K/V row it stores to BF16/FP16,
//! the kernels' rule (`crate::lower::ActDtype`); by default it stays FP32, the reference that
//! calibration measures quantization error against.
//!
//! It differs from the kernels' execution only where a reference must: every position's
//! logits are computed (the final norm and lm_head run on all rows, not the last one), and
//! each linear layer runs on FP32 weights fake-quantized to the format a [`PrecisionMap`]
//! assigns (quantized to the format's byte layout, then dequantized: the values the kernels
//! decode), with its input activations quantized dynamically where the map says so. Layers
//! absent from the map keep the checkpoint's FP32 weights: that is the full-precision reference
//! every error is measured against.
//!
//! Hooks: a [`Run`] can start at a residual-stream boundary (a block input) with a given value,
//! stop at one and return it, and swap one linear layer's weights; `observe` sees every linear
//! layer's input and output. With [`CpuModel::load_where`] holding only the parameters of the
//! steps it will execute, that is how calibration streams one block at a time through memory.

pub mod kernels;
#[cfg(target_arch = "x86_64")]
mod linear_avx2;
#[cfg(target_arch = "x86_64")]
mod linear_avx512;
#[cfg(target_arch = "x86_64")]
mod linear_packed;
pub mod mat;
pub mod moe;
mod params;
pub mod vmath;

use crate::error::{Error, Result};
use crate::ir::{Graph, Node, NodeId};
use crate::lower::{Act, ActDtype, PrecisionMap, Schedule, Step};
use crate::model::WeightSource;

pub use mat::Mat;
pub use params::LinearWeights;
use params::Params;

/// Which part of the schedule a forward pass executes.
#[derive(Default)]
pub struct Run<'a> {
    /// Start after this residual-stream node (a block input, see [`Graph::block_input`]),
    /// whose value is given: one stream of `tokens.len()` rows, or several stacked.
    pub from: Option<(NodeId, Mat)>,
    /// Stop after this residual-stream node and return its value (default: the logits).
    pub until: Option<NodeId>,
    /// Run this linear layer with these weights instead of the loaded ones.
    pub replace: Option<(NodeId, &'a LinearWeights)>,
}

/// A graph's schedule with (some of) its weights in memory, ready to run on the CPU.
pub struct CpuModel {
    graph: Graph,
    schedule: Schedule,
    /// The graph node of each schedule linear slot.
    linear_nodes: Vec<NodeId>,
    params: Params,
}

/// The activation buffers of one pass (`[tokens, cols]` each; the K/V of the running block),
/// each stored value rounded to `act`.
#[derive(Default)]
struct Buffers {
    act: ActDtype,
    acts: [Option<Mat>; Act::ALL.len()],
    k: Option<Mat>,
    v: Option<Mat>,
}

impl Buffers {
    fn take(&mut self, a: Act, step: usize) -> Result<Mat> {
        self.acts[a as usize].take().ok_or_else(|| {
            Error::invalid(
                "CPU forward",
                format!("step {step} reads buffer {a:?}, which no earlier step of this run wrote"),
            )
        })
    }

    fn get(&self, a: Act, step: usize) -> Result<&Mat> {
        self.acts[a as usize].as_ref().ok_or_else(|| {
            Error::invalid(
                "CPU forward",
                format!("step {step} reads buffer {a:?}, which no earlier step of this run wrote"),
            )
        })
    }

    fn put(&mut self, a: Act, mut m: Mat) {
        self.act.round_slice(&mut m.data);
        self.acts[a as usize] = Some(m);
    }
}

impl CpuModel {
    /// Loads every parameter the graph needs; linear layers named in `precision` are
    /// fake-quantized to their format.
    pub fn load(
        graph: &Graph,
        weights: &dyn WeightSource,
        precision: &PrecisionMap,
    ) -> Result<CpuModel> {
        let mut model = Self::load_where(graph, weights, precision, &|_| true)?;
        model.pack_linears();
        Ok(model)
    }

    /// Packs every loaded linear layer for the packed product where the CPU has AVX-512 or AVX2
    /// (a second
    /// copy of the weights: [`LinearWeights::with_panels`]). [`CpuModel::load`] does; the
    /// streamed stages of calibration ([`CpuModel::load_where`]) do not.
    pub fn pack_linears(&mut self) {
        for (slot, w) in self.schedule.linears.iter().zip(&mut self.params.linears) {
            if let Some(lw) = w.take() {
                *w = Some(lw.with_panels(slot.shape.n));
            }
        }
    }

    /// Loads the parameters of the nodes `keep` selects; running a step whose parameters were
    /// not loaded is an error.
    pub fn load_where(
        graph: &Graph,
        weights: &dyn WeightSource,
        precision: &PrecisionMap,
        keep: &dyn Fn(&Node) -> bool,
    ) -> Result<CpuModel> {
        let schedule = Schedule::build(graph, precision)?;
        let linear_nodes = schedule
            .linears
            .iter()
            .map(|l| {
                graph
                    .find(&l.name)
                    .expect("schedule slots name graph nodes")
            })
            .collect();
        let params = Params::load(graph, &schedule, weights, precision, keep)?;
        Ok(CpuModel {
            graph: graph.clone(),
            schedule,
            linear_nodes,
            params,
        })
    }

    /// This model storing activations and K/V in `act` (FP32 unless set).
    pub fn with_act(mut self, act: ActDtype) -> CpuModel {
        self.schedule = self.schedule.with_act(act);
        self
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// The schedule this model interprets.
    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// The loaded parameters of a linear node.
    pub fn linear(&self, id: NodeId) -> Option<&LinearWeights> {
        let slot = self.linear_nodes.iter().position(|&n| n == id)?;
        self.params.linears[slot].as_ref()
    }

    /// The loaded weight of norm slot `slot` ([`Schedule::norms`]).
    pub fn norm(&self, slot: usize) -> Option<&[f32]> {
        self.params.norms[slot].as_deref().map(Vec::as_slice)
    }

    /// Logits `[tokens, vocab]` of one window; token `i` sits at position `i`.
    pub fn forward(&self, tokens: &[u32]) -> Result<Mat> {
        self.execute(tokens, Run::default(), &mut |_, _, _| {})
    }

    /// The number of steps after which `id` (a residual-stream node) holds its value.
    fn boundary(&self, id: NodeId) -> Result<usize> {
        self.schedule
            .boundaries
            .get(&id)
            .copied()
            .ok_or_else(|| Error::Layer {
                layer: self.graph.node(id).name.clone(),
                reason: "a CPU forward can start or stop only at a residual-stream node".into(),
            })
    }

    /// Executes the steps `run` selects over one window and returns the residual stream at
    /// `run.until`, or the logits of every position. `observe(linear, input, output)` sees every
    /// linear layer that runs, with the input it received (before any activation quantization)
    /// and its own output (before a fused residual add).
    pub fn execute(
        &self,
        tokens: &[u32],
        run: Run,
        observe: &mut dyn FnMut(NodeId, &Mat, &Mat),
    ) -> Result<Mat> {
        let Run {
            from,
            until,
            replace,
        } = run;
        let mut b = Buffers {
            act: self.schedule.act,
            ..Buffers::default()
        };
        let start = match from {
            Some((id, value)) => {
                if tokens.is_empty() || value.rows % tokens.len() != 0 {
                    return Err(Error::invalid(
                        "CPU forward",
                        format!(
                            "a start value of {} rows is not a whole number of {}-token streams",
                            value.rows,
                            tokens.len()
                        ),
                    ));
                }
                b.put(Act::X, value);
                self.boundary(id)?
            }
            None => 0,
        };
        let end = match until {
            Some(id) => self.boundary(id)?,
            None => self.schedule.steps.len(),
        };
        for index in start..end {
            self.step(index, tokens, replace, &mut b, observe)?;
        }
        let out = if until.is_some() { Act::X } else { Act::Logits };
        b.take(out, end)
    }

    fn not_loaded(&self, what: &str) -> Error {
        Error::Layer {
            layer: what.to_string(),
            reason: "its parameters were not loaded into this model".into(),
        }
    }

    /// `x W^T (+ b)` of linear slot `linear` (the weights `replace` gives for its node, else
    /// the loaded ones), seen by `observe`.
    fn apply_linear(
        &self,
        linear: usize,
        replace: Option<(NodeId, &LinearWeights)>,
        x: &Mat,
        observe: &mut dyn FnMut(NodeId, &Mat, &Mat),
    ) -> Result<Mat> {
        let id = self.linear_nodes[linear];
        let weights = match replace {
            Some((r, w)) if r == id => w,
            _ => self.params.linears[linear]
                .as_ref()
                .ok_or_else(|| self.not_loaded(&self.schedule.linears[linear].name))?,
        };
        let y = weights.apply(self.schedule.linears[linear].shape.n, x);
        observe(id, x, &y);
        Ok(y)
    }

    /// Runs step `index` on `b`.
    fn step(
        &self,
        index: usize,
        tokens: &[u32],
        replace: Option<(NodeId, &LinearWeights)>,
        b: &mut Buffers,
        observe: &mut dyn FnMut(NodeId, &Mat, &Mat),
    ) -> Result<()> {
        let s = &self.schedule;
        let d = &s.dims;
        match s.steps[index] {
            Step::Embed => {
                let table = self.params.embedding.as_ref();
                let table = table.ok_or_else(|| self.not_loaded(&s.embedding_tensor))?;
                b.put(Act::X, kernels::embed(table, d.vocab, d.hidden, tokens)?);
            }
            Step::RmsNorm { norm, src, dst, .. } => {
                let w = self.params.norms[norm].as_ref();
                let w = w.ok_or_else(|| self.not_loaded(&s.norms[norm].tensor))?;
                let y = kernels::rms_norm(b.get(src, index)?, w, d.eps);
                b.put(dst, y);
            }
            // A W8A8 layer's weights quantize its input themselves (`LinearWeights::apply`).
            Step::Linear {
                linear, src, dst, ..
            } => {
                let slot = &s.linears[linear];
                let y = self.apply_linear(linear, replace, b.get(src, index)?, observe)?;
                if slot.shape.accumulate {
                    let acc = b.take(dst, index)?;
                    b.put(dst, kernels::add(acc, &y));
                } else {
                    b.put(dst, y);
                }
            }
            Step::RopeKv { qk_norm, .. } => {
                let norm = |slot: usize| -> Result<(&[f32], f32)> {
                    let w = self.params.norms[slot].as_ref();
                    let w = w.ok_or_else(|| self.not_loaded(&s.norms[slot].tensor))?;
                    Ok((w.as_slice(), d.eps))
                };
                let (q_norm, k_norm) = match qk_norm {
                    Some(n) => (Some(norm(n.q)?), Some(norm(n.k)?)),
                    None => (None, None),
                };
                let mut q = b.take(Act::Q, index)?;
                kernels::rope(&mut q, tokens.len(), d.heads, d.head_dim, &d.rope, q_norm);
                b.put(Act::Q, q);
                let mut k = b.take(Act::K, index)?;
                kernels::rope(
                    &mut k,
                    tokens.len(),
                    d.kv_heads,
                    d.head_dim,
                    &d.rope,
                    k_norm,
                );
                b.act.round_slice(&mut k.data);
                b.k = Some(k);
                b.v = Some(b.take(Act::V, index)?);
            }
            Step::Attention { window, .. } => {
                let (Some(k), Some(v)) = (b.k.take(), b.v.take()) else {
                    return Err(Error::invalid(
                        "CPU forward",
                        format!("attention step {index} runs before its RoPE/KV step"),
                    ));
                };
                let shape = kernels::AttentionShape {
                    heads: d.heads,
                    kv_heads: d.kv_heads,
                    head_dim: d.head_dim,
                    window,
                };
                let att =
                    kernels::causal_attention(b.get(Act::Q, index)?, &k, &v, tokens.len(), shape);
                b.put(Act::Att, att);
            }
            Step::SiluMul { .. } => {
                let gate = b.take(Act::Gate, index)?;
                let y = kernels::silu_mul(gate, b.get(Act::Up, index)?);
                b.put(Act::Gate, y);
            }
            Step::Moe { moe } => {
                let slot = &s.moes[moe];
                let router = self.params.routers[moe].as_ref();
                let router = router.ok_or_else(|| self.not_loaded(&slot.name))?;
                let mut acc = b.take(slot.dst, index)?;
                let x = b.get(slot.src, index)?;
                moe::block_forward(x, router, slot, b.act, &mut acc, |e, p, xe| {
                    self.apply_linear(slot.experts[e][p], replace, xe, observe)
                })?;
                b.put(slot.dst, acc);
            }
            // The reference keeps every position's logits; generation's argmax is not its job.
            Step::Argmax | Step::QuantFp8 { .. } => {}
        }
        Ok(())
    }
}
