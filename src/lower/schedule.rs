//! The kernel schedule of a plan: the ordered steps of one forward pass over `m` new tokens
//! (prefill: the prompt; decode: one token), each bound to the kernel specialisation(s) it
//! launches and to named activation buffers. Built from the IR graph and a precision map; it
//! holds no weights, so codegen needs only this, while the executable plan (runtime::exec)
//! pairs it with packed weights and runs it on a backend.
//!
//! Fusions relative to the graph: RoPE of q and k plus the KV-cache store are one step, each
//! residual add is the epilogue of the o_proj / down_proj linear (`accumulate`), and the final
//! norm, lm_head and argmax run on the last token only (generation needs no other logits).
//! Qwen3's per-head RMSNorm of q and k is part of the RoPE step too (normalised, rotated and
//! stored with one rounding).

use serde::Serialize;

use super::dtype::ActDtype;
pub use super::moe::MoeSlot;
use super::spec::{KernelSpec, LinearShape, WeightFormat};
pub use super::step::{Act, NormSlot, Param, QkNorm, Step};
use super::PrecisionMap;
use crate::error::{Error, Result};
use crate::formats::Format;
use crate::ir::{Graph, Linear, LinearKind, NodeId, Op};

/// The shapes of the decoder the steps run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Dims {
    pub hidden: usize,
    pub ffn: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub q_dim: usize,
    pub kv_dim: usize,
    pub vocab: usize,
    pub layers: usize,
    pub eps: f32,
    /// RoPE base and frequency scaling ([`ModelSpec::rope`](crate::model::ModelSpec::rope)):
    /// every backend builds its cos/sin tables from this one value.
    pub rope: crate::model::rope::Rope,
}

/// One linear layer of the schedule.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LinearSlot {
    /// Graph node name (`model.layers.0.self_attn.q_proj`, `lm_head`).
    pub name: String,
    pub weight_tensor: String,
    pub bias_tensor: Option<String>,
    pub kind: LinearKind,
    pub shape: LinearShape,
    /// Activations quantized to this format before the product (the CPU interpreter runs
    /// every format; the generated kernels FP8 with FP8 weights, `shape.w8a8`:
    /// [`Schedule::check_kernels`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub activations: Option<Format>,
}

/// The schedule of a model under a precision map.
#[derive(Debug, Clone, Serialize)]
pub struct Schedule {
    pub dims: Dims,
    pub embedding_tensor: String,
    /// RMSNorm weights, indexed by [`Step::RmsNorm::norm`] and [`QkNorm`], in the graph's
    /// order of its norm nodes.
    pub norms: Vec<NormSlot>,
    pub linears: Vec<LinearSlot>,
    /// The mixture-of-experts blocks, indexed by [`Step::Moe::moe`].
    pub moes: Vec<MoeSlot>,
    pub steps: Vec<Step>,
    /// Element type of every activation buffer and of the KV cache.
    pub act: ActDtype,
    /// Residual-stream nodes (the embedding and each block's output) and the number of steps
    /// after which their value is in [`Act::X`]: where a pass can start or stop.
    #[serde(skip)]
    pub boundaries: std::collections::BTreeMap<NodeId, usize>,
}

impl Schedule {
    /// This schedule with activations and KV cache in `act` (every kernel spec follows).
    pub fn with_act(mut self, act: ActDtype) -> Schedule {
        self.act = act;
        for l in &mut self.linears {
            l.shape.act = act;
        }
        self
    }

    /// The steps of `graph` with each linear layer in the format `precision` assigns (FP32
    /// where it assigns none), on FP32 activations ([`Schedule::with_act`] changes that).
    /// A W8A8 linear's input is quantized by the RMSNorm that produces it, else by a
    /// [`Step::QuantFp8`] before it (once for q/k/v or gate/up reading one buffer).
    pub fn build(graph: &Graph, precision: &PrecisionMap) -> Result<Schedule> {
        let spec = graph.spec();
        let dims = Dims {
            hidden: spec.hidden_size,
            ffn: spec.intermediate_size,
            heads: spec.num_heads,
            kv_heads: spec.num_kv_heads,
            head_dim: spec.head_dim,
            q_dim: spec.num_heads * spec.head_dim,
            kv_dim: spec.num_kv_heads * spec.head_dim,
            vocab: spec.vocab_size,
            layers: spec.num_layers,
            eps: spec.rms_norm_eps,
            rope: spec.rope(),
        };
        if !dims.head_dim.is_multiple_of(2)
            || dims.kv_heads == 0
            || !dims.heads.is_multiple_of(dims.kv_heads)
        {
            return Err(Error::invalid(
                "model for codegen",
                format!(
                    "head_dim {} must be even and heads {} a multiple of kv_heads {}",
                    dims.head_dim, dims.heads, dims.kv_heads
                ),
            ));
        }
        super::check_precision_targets(graph, precision)?;
        let mut s = Schedule {
            dims,
            embedding_tensor: String::new(),
            norms: Vec::new(),
            linears: Vec::new(),
            moes: Vec::new(),
            steps: Vec::new(),
            act: ActDtype::F32,
            boundaries: Default::default(),
        };
        // The buffer holding each node's value, assigned while walking the graph: every step
        // reads its operands from the buffers of the nodes its incoming edges come from.
        let mut held = Buffers {
            graph,
            held: vec![None; graph.node_count()],
        };
        // The q and k head norms of the block being walked, until its RoPE step takes them.
        let mut head_norms: [Option<usize>; 2] = [None, None];
        // The buffer whose rows the FP8 buffers hold quantized, until a step rewrites it.
        let mut quantized: Option<Act> = None;
        for &id in graph.topo_order() {
            let node = graph.node(id);
            let value = match &node.op {
                Op::Embedding { tensor, .. } => {
                    s.embedding_tensor = tensor.clone();
                    s.steps.push(Step::Embed);
                    Act::X
                }
                Op::RmsNorm { tensor, dim, .. } => {
                    let last_row = node.layer.is_none();
                    s.norms.push(NormSlot {
                        tensor: tensor.clone(),
                        dim: *dim,
                    });
                    s.steps.push(Step::RmsNorm {
                        norm: s.norms.len() - 1,
                        src: held.operand(id, 0)?,
                        dst: Act::Xn,
                        last_row,
                        quant: false,
                    });
                    Act::Xn
                }
                _ if super::moe::build_node(
                    graph,
                    id,
                    &mut s,
                    held.operand(id, 0).ok(),
                    precision,
                )? =>
                {
                    continue;
                }
                Op::Linear(l) => {
                    // A projection whose only consumer is a residual add writes into the
                    // residual stream: the add is the linear's accumulate epilogue.
                    let residual = fused_residual(graph, id);
                    let dst = match (residual, l.kind) {
                        (Some(add), _) => held.operand(add, 0)?,
                        (None, LinearKind::Q) => Act::Q,
                        (None, LinearKind::K) => Act::K,
                        (None, LinearKind::V) => Act::V,
                        (None, LinearKind::Gate) => Act::Gate,
                        (None, LinearKind::Up) => Act::Up,
                        (None, LinearKind::LmHead) => Act::Logits,
                        (None, LinearKind::O | LinearKind::Down) => {
                            return Err(Error::Layer {
                                layer: node.name.clone(),
                                reason: "its output does not feed a residual add; codegen fuses \
                                         o_proj/down_proj into one"
                                    .into(),
                            })
                        }
                    };
                    let slot =
                        linear_slot(&node.name, l, precision.get(&node.name), residual.is_some());
                    let (src, w8a8) = (held.operand(id, 0)?, slot.shape.w8a8);
                    if w8a8 && quantized != Some(src) {
                        quantize_input(&mut s.steps, src);
                        quantized = Some(src);
                    }
                    s.linears.push(slot);
                    s.steps.push(Step::Linear {
                        linear: s.linears.len() - 1,
                        src,
                        dst,
                        w8a8,
                    });
                    dst
                }
                // Fused into the RoPE step: normalised in place, in the buffer it reads.
                Op::HeadNorm {
                    tensor, head_dim, ..
                } => {
                    let (which, act) = match held.operand(id, 0)? {
                        Act::Q => (0, Act::Q),
                        Act::K => (1, Act::K),
                        other => {
                            return Err(Error::Layer {
                                layer: node.name.clone(),
                                reason: format!(
                                    "a per-head norm of buffer {other:?}; the RoPE step \
                                     normalises q and k only"
                                ),
                            })
                        }
                    };
                    s.norms.push(NormSlot {
                        tensor: tensor.clone(),
                        dim: *head_dim,
                    });
                    head_norms[which] = Some(s.norms.len() - 1);
                    act
                }
                // q's rotation waits for k's: both run in one step after the v projection,
                // in place on the query buffer (the rotated keys go to the KV cache).
                Op::Rope { .. } if node.name.ends_with("rope_q") => held.expect(id, 0, Act::Q)?,
                Op::Rope { .. } => {
                    held.expect(id, 0, Act::K)?;
                    let qk_norm = match std::mem::take(&mut head_norms) {
                        [Some(q), Some(k)] => Some(QkNorm { q, k }),
                        [None, None] => None,
                        _ => {
                            return Err(Error::Layer {
                                layer: node.name.clone(),
                                reason: "a per-head norm of only one of q and k; the RoPE \
                                         step normalises both or neither"
                                    .into(),
                            })
                        }
                    };
                    s.steps.push(Step::RopeKv {
                        layer: layer_of(node.layer, &node.name)?,
                        qk_norm,
                    });
                    Act::K
                }
                Op::Attention { window, .. } => {
                    for (slot, act) in [(0, Act::Q), (1, Act::K), (2, Act::V)] {
                        held.expect(id, slot, act)?;
                    }
                    s.steps.push(Step::Attention {
                        layer: layer_of(node.layer, &node.name)?,
                        window: *window,
                    });
                    Act::Att
                }
                Op::SiluMul { .. } => {
                    held.expect(id, 0, Act::Gate)?;
                    held.expect(id, 1, Act::Up)?;
                    s.steps.push(Step::SiluMul { quant: false });
                    Act::Gate
                }
                Op::Add { .. } => {
                    check_fused_add(graph, id)?;
                    held.operand(id, 0)?
                }
                Op::Router { .. } | Op::ExpertRows { .. } | Op::MoeCombine { .. } => {
                    unreachable!("super::moe::build_node takes the MoE nodes")
                }
            };
            held.held[id.index()] = Some(value);
            if quantized == Some(value) {
                quantized = None;
            }
            if value == Act::X {
                s.boundaries.insert(id, s.steps.len());
            }
        }
        s.steps.push(Step::Argmax);
        super::moe::check_complete(&s)?;
        Ok(s)
    }

    /// Refuses what the generated kernels cannot run yet: activation quantization other than
    /// W8A8 (FP8 weights with FP8 activations) of a dense linear, and MoE blocks whose experts
    /// do not share one format per projection ([`Schedule::check_expert_kernels`]).
    pub fn check_kernels(&self) -> Result<()> {
        self.check_expert_kernels()?;
        let experts: std::collections::BTreeSet<usize> =
            self.moes.iter().flat_map(MoeSlot::linears).collect();
        let unsupported = self.linears.iter().enumerate().find_map(|(i, l)| {
            let a = l.activations?;
            (!l.shape.w8a8 || experts.contains(&i)).then_some((l, a))
        });
        match unsupported {
            Some((l, a)) => Err(Error::Layer {
                layer: l.name.clone(),
                reason: format!(
                    "{} weights with {a} activations: the generated kernels quantize activations \
                     only as W8A8 (fp8 weights, fp8 activations) in dense layers",
                    l.shape.format
                ),
            }),
            None => Ok(()),
        }
    }

    /// The kernels `step` launches (a linear step: its GEMV and its GEMM).
    pub fn kernels_of(&self, step: &Step) -> Vec<KernelSpec> {
        let d = &self.dims;
        let act = self.act;
        match *step {
            Step::Embed => vec![KernelSpec::Embedding {
                vocab: d.vocab,
                hidden: d.hidden,
                act,
            }],
            Step::RmsNorm { quant, .. } => vec![KernelSpec::RmsNorm {
                dim: d.hidden,
                act,
                quant,
            }],
            Step::QuantFp8 { src } => vec![KernelSpec::QuantFp8 {
                dim: self.act_cols(src),
                act,
            }],
            Step::Linear { linear, .. } => {
                let shape = self.linears[linear].shape;
                vec![KernelSpec::Gemv(shape), KernelSpec::Gemm(shape)]
            }
            Step::RopeKv { qk_norm, .. } => vec![KernelSpec::RopeKv {
                heads: d.heads,
                kv_heads: d.kv_heads,
                head_dim: d.head_dim,
                act,
                qk_norm: qk_norm.is_some(),
            }],
            Step::Attention { window, .. } => vec![KernelSpec::Attention {
                heads: d.heads,
                kv_heads: d.kv_heads,
                head_dim: d.head_dim,
                act,
                window,
            }],
            Step::SiluMul { quant } => vec![KernelSpec::SiluMul {
                dim: d.ffn,
                act,
                quant,
            }],
            Step::Moe { moe } => self.moe_kernels(moe).to_vec(),
            Step::Argmax => vec![KernelSpec::Argmax {
                vocab: d.vocab,
                act,
            }],
        }
    }

    /// The launches of `step` in a pass of `m` rows: one kernel for every step but a MoE
    /// block's ([`Schedule::moe_launches`]); a linear step launches the GEMV or GEMM entry
    /// [`LinearShape::kernel_for_rows`] picks. `decode`: the embedding reads the previous
    /// argmax's token.
    pub fn launches(&self, step: &Step, m: usize, decode: bool) -> Vec<StepLaunch> {
        let (spec, entry) = match *step {
            Step::Moe { moe } => return self.moe_launches(moe, m),
            Step::Linear { linear, .. } => self.linears[linear].shape.kernel_for_rows(step.rows(m)),
            _ => {
                let spec = self.kernels_of(step)[0];
                (spec, spec.name())
            }
        };
        vec![StepLaunch {
            spec,
            entry,
            params: step.params(decode),
            rows: step.rows(m),
            row0: step.row0(m),
        }]
    }

    /// The entry points `step` launches in a pass of `m` rows, joined by `+`.
    pub fn entry_of(&self, step: &Step, m: usize) -> String {
        let entries: Vec<String> = (self.launches(step, m, false).into_iter())
            .map(|l| l.entry)
            .collect();
        entries.join("+")
    }

    /// Every kernel of the schedule, deduplicated and sorted.
    pub fn kernels(&self) -> Vec<KernelSpec> {
        let set: std::collections::BTreeSet<KernelSpec> =
            self.steps.iter().flat_map(|s| self.kernels_of(s)).collect();
        set.into_iter().collect()
    }

    /// Elements of an activation buffer per row.
    pub fn act_cols(&self, act: Act) -> usize {
        let d = &self.dims;
        match act {
            Act::X | Act::Xn => d.hidden,
            Act::Q | Act::Att => d.q_dim,
            Act::K | Act::V => d.kv_dim,
            Act::Gate | Act::Up => d.ffn,
            Act::Logits => d.vocab,
            Act::ExpertGate | Act::ExpertUp => self.expert_ffn(),
            Act::ExpertOut => d.hidden,
        }
    }

    /// Columns of the FP8 buffers ([`Param::XCodes`]): the widest input of a W8A8 linear (0
    /// without one).
    pub fn x_codes_cols(&self) -> usize {
        (self.linears.iter())
            .filter(|l| l.shape.w8a8)
            .map(|l| l.shape.k)
            .max()
            .unwrap_or(0)
    }

    /// Rows of activation buffer `a` in a sequence of `max_seq` positions: one for the logits,
    /// `top_k` per position for a MoE block's pair rows.
    pub fn act_rows(&self, max_seq: usize, a: Act) -> usize {
        match a {
            Act::Logits => 1,
            Act::ExpertGate | Act::ExpertUp | Act::ExpertOut => max_seq * self.moe_top_k(),
            _ => max_seq,
        }
    }
}

/// One kernel launch of a step: the kernel, its entry point, its parameters in the order of
/// the template's signature (every backend binds this list), the rows it processes (the
/// launch dimensions and its `Rows` value) and the first row a last-row RMSNorm reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepLaunch {
    pub spec: KernelSpec,
    pub entry: String,
    pub params: Vec<super::Param>,
    pub rows: usize,
    pub row0: i32,
}

/// The slot of linear node `name` in precision `p` (FP32 weights without one), on FP32
/// activations; `accumulate`: its output is added to its destination.
pub(super) fn linear_slot(
    name: &str,
    l: &Linear,
    p: Option<&super::LinearPrecision>,
    accumulate: bool,
) -> LinearSlot {
    LinearSlot {
        name: name.to_string(),
        weight_tensor: l.weight.clone(),
        bias_tensor: l.bias.clone(),
        kind: l.kind,
        shape: LinearShape {
            format: WeightFormat::of(p.map(|p| p.weights)),
            n: l.out_features,
            k: l.in_features,
            bias: l.bias.is_some(),
            accumulate,
            act: ActDtype::F32,
            w8a8: p.is_some_and(|p| p.is_w8a8()),
        },
        activations: p.and_then(|p| p.activations),
    }
}

/// Makes the FP8 buffers hold `src` quantized before the next step: by the RMSNorm or the
/// SiLU-gate that has just written it (fused), else by a quantizing step of its own.
fn quantize_input(steps: &mut Vec<Step>, src: Act) {
    match steps.last_mut() {
        Some(Step::RmsNorm { dst, quant, .. }) if *dst == src => *quant = true,
        Some(Step::SiluMul { quant }) if src == Act::Gate => *quant = true,
        _ => steps.push(Step::QuantFp8 { src }),
    }
}

fn layer_of(layer: Option<usize>, name: &str) -> Result<usize> {
    layer.ok_or_else(|| Error::Layer {
        layer: name.to_string(),
        reason: "attention outside a decoder block".into(),
    })
}

/// The residual add `linear` is fused into: its only consumer, when that is an add taking it
/// as the branch operand (slot 1).
fn fused_residual(graph: &Graph, linear: NodeId) -> Option<NodeId> {
    let consumers = graph.consumers(linear);
    match consumers.as_slice() {
        [add]
            if matches!(graph.node(*add).op, Op::Add { .. })
                && graph.inputs(*add).get(1) == Some(&linear) =>
        {
            Some(*add)
        }
        _ => None,
    }
}

/// Which activation buffer holds each node's value during [`Schedule::build`].
struct Buffers<'g> {
    graph: &'g Graph,
    held: Vec<Option<Act>>,
}

impl Buffers<'_> {
    /// The buffer holding operand `slot` of `id` (the source of that incoming edge).
    fn operand(&self, id: NodeId, slot: usize) -> Result<Act> {
        let g = self.graph;
        let src = *g.inputs(id).get(slot).ok_or_else(|| Error::Layer {
            layer: g.node(id).name.clone(),
            reason: format!("operand {slot} is missing"),
        })?;
        self.held[src.index()].ok_or_else(|| Error::Layer {
            layer: g.node(id).name.clone(),
            reason: format!(
                "operand `{}` is not held in a buffer the kernels can read",
                g.node(src).name
            ),
        })
    }

    /// The buffer of operand `slot`, which must be `want` (the buffer its kernel reads).
    fn expect(&self, id: NodeId, slot: usize, want: Act) -> Result<Act> {
        let got = self.operand(id, slot)?;
        if got == want {
            Ok(got)
        } else {
            Err(Error::Layer {
                layer: self.graph.node(id).name.clone(),
                reason: format!(
                    "operand {slot} is held in buffer {got:?}; its kernel reads {want:?}"
                ),
            })
        }
    }
}

/// A residual add must add a linear layer's output (fused as that linear's epilogue) to the
/// residual stream.
fn check_fused_add(graph: &Graph, id: NodeId) -> Result<()> {
    let fused = graph
        .inputs(id)
        .get(1)
        .is_some_and(|&b| match graph.node(b).op {
            Op::Linear(_) => fused_residual(graph, b) == Some(id),
            // The MoE step adds its output into the stream itself.
            Op::MoeCombine { .. } => true,
            _ => false,
        });
    if fused {
        Ok(())
    } else {
        Err(Error::Layer {
            layer: graph.node(id).name.clone(),
            reason: "residual add does not follow a linear layer used only by it; codegen cannot fuse it"
                .into(),
        })
    }
}
