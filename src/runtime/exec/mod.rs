//! Executable plans: a [`Schedule`] (the ordered steps of a forward pass, bound to kernels)
//! together with the buffers it runs on, the weights packed in each layer's format byte layout
//! (the layout the kernels read), the RoPE tables, and the KV-cache size.
//!
//! The same steps run on every backend ([`Backend`]): `cpu` (this module, in Rust: the CPU
//! interpreter's own ops on the weights the packed bytes decode to), `cuda` (the generated
//! kernels) and `emu` (the generated kernels on the CPU, `runtime::emu`); the last two through
//! one launcher ([`crate::runtime::launch`]). Every backend keeps activations and the KV cache
//! in the schedule's [`crate::lower::ActDtype`]. The two host backends share their buffers'
//! layout ([`HostState`]) and run step by step ([`HostBackend`]), so [`compare_steps`] can
//! check every kernel launch against the cpu backend on identical inputs. Prefill runs the
//! steps over the prompt's `m` tokens; one decode step runs them over one token; both leave
//! the greedy next token. [`generate`] drives a backend and times it.

mod cpu;
mod generate;
mod host;

pub use crate::runtime::cpu::kernels::argmax;
pub(crate) use cpu::check_pass;
pub use cpu::{reference_linear, CpuBackend};
pub use generate::{generate, greedy_reference, Backend, Generation, LatencyStats};
pub use host::{compare_steps, HostBackend, HostBuf, HostMemory, HostState, StepComparison};

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::formats::{Format, QuantizedMatrix, Scales};
use crate::ir::Graph;
use crate::lower::{ActDtype, PrecisionMap, Schedule, WeightFormat};
use crate::model::{Tensor, WeightSource};

/// Scales of a packed linear layer, as the kernels read them.
#[derive(Debug, Clone, PartialEq)]
pub enum PackedScales {
    /// f32, fp16: none.
    None,
    /// fp8: one FP32 per output row.
    Row(Vec<f32>),
    /// nvfp4 (E4M3) / mxfp4 (E8M0): one byte per (row, block), row-major.
    Block(Vec<u8>),
}

impl PackedScales {
    /// The scales as the kernels' `scales` argument reads them: fp8 row scales as little-endian
    /// FP32 bytes, FP4 block scales as stored, nothing for f32/fp16. Every backend uploads
    /// these bytes.
    pub fn kernel_bytes(&self) -> Vec<u8> {
        match self {
            PackedScales::None => Vec::new(),
            PackedScales::Row(s) => s.iter().flat_map(|v| v.to_le_bytes()).collect(),
            PackedScales::Block(b) => b.clone(),
        }
    }
}

/// A linear layer's parameters in its format's byte layout.
#[derive(Debug, Clone)]
pub struct PackedLinear {
    pub format: WeightFormat,
    /// Row-major codes, `n` rows of `format.row_stride_bytes(k)` bytes.
    pub codes: Vec<u8>,
    pub scales: PackedScales,
    /// NVFP4 tensor scale (1 for other formats).
    pub global: f32,
    pub bias: Option<Vec<f32>>,
}

impl PackedLinear {
    /// Packs a row-major `[n, k]` FP32 matrix (NVFP4 against `tensor_amax` where its fused
    /// group shares one: [`crate::lower::fused`]).
    pub fn pack(
        format: WeightFormat,
        w: &[f32],
        n: usize,
        k: usize,
        bias: Option<Vec<f32>>,
        tensor_amax: Option<f32>,
    ) -> Self {
        let Some(f) = format.format() else {
            return PackedLinear {
                format,
                codes: w.iter().flat_map(|v| v.to_le_bytes()).collect(),
                scales: PackedScales::None,
                global: 1.0,
                bias,
            };
        };
        let q = f.quantize_against(w, n, k, tensor_amax);
        let (scales, global) = match q.scales {
            Scales::None => (PackedScales::None, 1.0),
            Scales::Row(s) => (PackedScales::Row(s), 1.0),
            Scales::Nvfp4 { block, global } => (PackedScales::Block(block), global),
            Scales::Mxfp4 { block } => (PackedScales::Block(block), 1.0),
        };
        PackedLinear {
            format,
            codes: q.codes,
            scales,
            global,
            bias,
        }
    }

    /// The FP32 `[n, k]` weights these bytes decode to: exactly the values the kernels compute
    /// with (the formats' own decoders, `crate::formats`).
    pub fn dequantize(&self, n: usize, k: usize) -> Vec<f32> {
        let Some(format) = self.format.format() else {
            return crate::lower::ActDtype::F32.decode(&self.codes);
        };
        let scales = match (&self.scales, format) {
            (PackedScales::None, _) => Scales::None,
            (PackedScales::Row(s), _) => Scales::Row(s.clone()),
            (PackedScales::Block(b), Format::Nvfp4) => Scales::Nvfp4 {
                block: b.clone(),
                global: self.global,
            },
            (PackedScales::Block(b), _) => Scales::Mxfp4 { block: b.clone() },
        };
        QuantizedMatrix {
            format,
            rows: n,
            cols: k,
            codes: self.codes.clone(),
            scales,
        }
        .dequantize()
    }

    /// Bytes of codes and scales (what a decode step streams from memory).
    pub fn weight_bytes(&self) -> usize {
        self.codes.len()
            + match &self.scales {
                PackedScales::None => 0,
                PackedScales::Row(s) => 4 * s.len(),
                PackedScales::Block(b) => b.len(),
            }
    }
}

/// A plan ready to run: schedule, packed weights and tables.
pub struct ExecutablePlan {
    pub schedule: Schedule,
    /// Positions the KV cache holds (prompt + generated tokens).
    pub max_seq: usize,
    /// Embedding table `[vocab, hidden]` (FP32; backends store it in the activation type).
    pub embedding: Arc<Vec<f32>>,
    /// RMSNorm weights, by [`Schedule::norms`] slot (`hidden` or `head_dim` long).
    pub norms: Vec<Vec<f32>>,
    /// One per [`Schedule::linears`] entry.
    pub linears: Vec<PackedLinear>,
    /// RoPE tables `[max_seq, head_dim / 2]`, the CPU reference's values.
    pub rope_cos: Vec<f32>,
    pub rope_sin: Vec<f32>,
    /// Router weights `[experts, hidden]` (FP32), by [`Schedule::moes`] slot.
    pub routers: Vec<Vec<f32>>,
}

impl ExecutablePlan {
    /// Loads and packs every parameter `graph` needs, in the formats `precision` assigns, for
    /// activations and KV cache in `act`.
    pub fn build(
        graph: &Graph,
        weights: &dyn WeightSource,
        precision: &PrecisionMap,
        max_seq: usize,
        act: ActDtype,
    ) -> Result<ExecutablePlan> {
        let schedule = Schedule::build(graph, precision)?.with_act(act);
        schedule.check_kernels()?;
        let d = schedule.dims.clone();
        if max_seq == 0 || max_seq > graph.spec().max_position_embeddings.max(1) {
            return Err(Error::invalid(
                "max_seq",
                format!(
                    "{max_seq} positions; the model supports 1..={}",
                    graph.spec().max_position_embeddings
                ),
            ));
        }
        let load = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
            let t: Tensor = weights.tensor(name)?;
            if t.shape != shape {
                return Err(Error::Layer {
                    layer: name.to_string(),
                    reason: format!("tensor has shape {:?}, expected {shape:?}", t.shape),
                });
            }
            Ok(t.data)
        };
        let embedding = Arc::new(load(&schedule.embedding_tensor, &[d.vocab, d.hidden])?);
        let norms = schedule
            .norms
            .iter()
            .map(|n| load(&n.tensor, &[n.dim]))
            .collect::<Result<Vec<_>>>()?;
        let formats: std::collections::HashMap<&str, Option<crate::formats::Format>> = schedule
            .linears
            .iter()
            .map(|l| (l.name.as_str(), l.shape.format.format()))
            .collect();
        let shared_amax = crate::lower::fused::nvfp4_tensor_amax(graph, weights, &|n| {
            formats.get(n).copied().flatten()
        })?;
        let linears = schedule
            .linears
            .iter()
            .map(|l| {
                let (n, k) = (l.shape.n, l.shape.k);
                let w = if l.weight_tensor == schedule.embedding_tensor {
                    embedding.as_ref().clone()
                } else {
                    load(&l.weight_tensor, &[n, k])?
                };
                let bias = match &l.bias_tensor {
                    Some(b) => Some(load(b, &[n])?),
                    None => None,
                };
                let amax = shared_amax.get(&l.name).copied();
                Ok(PackedLinear::pack(l.shape.format, &w, n, k, bias, amax))
            })
            .collect::<Result<Vec<_>>>()?;
        let routers = (schedule.moes.iter())
            .map(|m| load(&m.router_tensor, &[m.experts.len(), d.hidden]))
            .collect::<Result<Vec<_>>>()?;
        let (rope_cos, rope_sin) =
            crate::runtime::cpu::kernels::rope_tables(max_seq, d.head_dim, &d.rope);
        Ok(ExecutablePlan {
            schedule,
            max_seq,
            embedding,
            norms,
            linears,
            rope_cos,
            rope_sin,
            routers,
        })
    }

    /// Bytes of linear-layer weights a decode step reads.
    pub fn linear_weight_bytes(&self) -> usize {
        self.linears.iter().map(PackedLinear::weight_bytes).sum()
    }
}
