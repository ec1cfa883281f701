//! The steps of a schedule and what each passes its kernel: the activation buffers ([`Act`]),
//! the [`Step`]s of a forward pass, and each step's kernel parameters in the order of its
//! template's signature ([`Step::params`], the one list every backend binds).

use serde::Serialize;

/// Activation buffers (row-major, one row per token of the pass, elements of the schedule's
/// [`ActDtype`](super::ActDtype)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Act {
    /// Residual stream `[m, hidden]`.
    X,
    /// Normalized residual `[m, hidden]`.
    Xn,
    Q,
    K,
    V,
    /// Attention output `[m, q_dim]`.
    Att,
    Gate,
    Up,
    /// `[1, vocab]`.
    Logits,
    /// A MoE block's pair rows (one per token and chosen expert, `[m * top_k, cols]`): the
    /// experts' gate (then SiLU-gate) and up outputs, and their down outputs.
    ExpertGate,
    ExpertUp,
    ExpertOut,
}

impl Act {
    /// Every activation buffer, in the order backends allocate them.
    pub const ALL: [Act; 12] = [
        Act::X,
        Act::Xn,
        Act::Q,
        Act::K,
        Act::V,
        Act::Att,
        Act::Gate,
        Act::Up,
        Act::Logits,
        Act::ExpertGate,
        Act::ExpertUp,
        Act::ExpertOut,
    ];
}

/// An RMSNorm weight of the schedule: its tensor and length (`hidden`, or `head_dim` for a
/// per-head norm of q or k).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NormSlot {
    pub tensor: String,
    pub dim: usize,
}

/// The per-head RMSNorm of q and k a RoPE step applies first (Qwen3): their
/// [`Schedule::norms`](super::Schedule::norms) slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct QkNorm {
    pub q: usize,
    pub k: usize,
}

/// One step of a forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Step {
    /// Token ids -> `X`.
    Embed,
    /// `dst = rmsnorm(src) * norms[norm]`; `last_row`: only the pass's last row, into row 0;
    /// `quant`: `dst`'s rows (as stored) also quantized into the FP8 buffers
    /// ([`Param::XCodes`], [`Param::XScales`]) for the W8A8 linears that read them.
    RmsNorm {
        norm: usize,
        src: Act,
        dst: Act,
        last_row: bool,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        quant: bool,
    },
    /// `src`'s rows quantized per row to FP8 into the FP8 buffers, for the W8A8 linears that
    /// read them (where no RMSNorm producer does it).
    QuantFp8 { src: Act },
    /// `dst (+)= src W^T (+ b)` with `linears[linear]` (GEMV for <= 8 rows, else GEMM);
    /// `w8a8`: the layer reads `src` from the FP8 buffers a quantizing step filled.
    Linear {
        linear: usize,
        src: Act,
        dst: Act,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        w8a8: bool,
    },
    /// RoPE of `Q` in place; RoPE of `K` and a copy of `V` into layer `layer`'s KV cache;
    /// with `qk_norm`, each head of q and k RMS-normalised first.
    RopeKv {
        layer: usize,
        #[serde(skip_serializing_if = "Option::is_none")]
        qk_norm: Option<QkNorm>,
    },
    /// `Att` = attention of `Q` over layer `layer`'s KV cache (the last `window` positions
    /// of it when set).
    Attention {
        layer: usize,
        #[serde(skip_serializing_if = "Option::is_none")]
        window: Option<usize>,
    },
    /// `Gate = silu(Gate) * Up`; `quant`: each stored row is also quantized into the FP8
    /// buffers (`XCodes`, `XScales`) for the W8A8 down projection that reads it.
    SiluMul {
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        quant: bool,
    },
    /// Mixture-of-experts block `moes[moe]` ([`super::moe`]): routes each row of its source,
    /// runs the chosen experts' MLPs and adds their weighted sum to its destination. The
    /// kernels run it as six launches
    /// ([`Schedule::moe_launches`](super::Schedule::moe_launches)): routing, the experts'
    /// gate, up, SiLU-gate and down over the routed pairs, and the weighted combine.
    Moe { moe: usize },
    /// Next token = argmax of `Logits`.
    Argmax,
}

/// One kernel parameter of a step, in the order of its template's signature. Every backend
/// binds the same list to its buffers and values (`runtime::launch::launch_args`), so the
/// argument order lives here once, with a MoE block's in `Schedule::moe_launches` (and
/// tests/codegen.rs checks every launch's list against the rendered signature).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param {
    /// An activation buffer (`act_t*`).
    Act(Act),
    /// The prompt's token ids (`const int*`).
    Tokens,
    /// The greedy next token (`int*`, one element): argmax's output, a decode step's input.
    Next,
    /// The embedding table (`const act_t*`).
    Embedding,
    /// RMSNorm weight `i` of [`Schedule::norms`] (`const float*`).
    Norm(usize),
    /// Layer `i`'s K or V cache (`act_t*`).
    KCache(usize),
    VCache(usize),
    /// RoPE tables (`const float*`).
    RopeCos,
    RopeSin,
    /// The pass's first position (`const int*`, one element).
    Pos,
    /// Split attention's partial results and counters (`float*`, [`super::split_kv`]).
    AttnPartials,
    /// Value: the pass's rows (`int`).
    Rows,
    /// Value: the RMSNorm epsilon (`float`).
    Eps,
    /// Value: the first row a last-row RMSNorm reads (`int`).
    Row0,
    /// Linear layer `i`'s codes (`const u8*`), scales (`const void*`), NVFP4 tensor scale
    /// (value, `float`) and bias (`const float*`).
    LinearCodes(usize),
    LinearScales(usize),
    LinearGlobal(usize),
    LinearBias(usize),
    /// MoE block `i`'s router weights (`const float*`, `[experts, hidden]`).
    Router(usize),
    /// The routing of the block being run: each pair's expert (`int*`) and weight (`float*`),
    /// `top_k` per row.
    RouteIds,
    RouteWeights,
    /// Projection `p` (0 gate, 1 up, 2 down) of MoE block `i`, every expert's stacked in
    /// expert order: codes (`const u8*`), scales (`const void*`), NVFP4 tensor scales (`const
    /// float*`, one per expert) and biases (`const float*`).
    ExpertCodes(usize, usize),
    ExpertScales(usize, usize),
    ExpertGlobals(usize, usize),
    ExpertBias(usize, usize),
    /// A pass's activations quantized to FP8 for W8A8 linears: E4M3 codes (`u8*`, `[m, k]`)
    /// and one scale per row (`float*`), written by a quantizing step, read by the linears.
    XCodes,
    XScales,
}

impl Step {
    /// The kernel parameters of this step; `decode`: the embedding reads the previous argmax's
    /// token.
    pub fn params(&self, decode: bool) -> Vec<Param> {
        use Param as P;
        match *self {
            Step::Embed => {
                let tokens = if decode { P::Next } else { P::Tokens };
                vec![tokens, P::Embedding, P::Act(Act::X), P::Rows]
            }
            Step::RmsNorm {
                norm,
                src,
                dst,
                quant,
                ..
            } => {
                let mut p = vec![P::Act(src), P::Norm(norm), P::Act(dst), P::Eps, P::Row0];
                if quant {
                    p.extend([P::XCodes, P::XScales]);
                }
                p
            }
            Step::QuantFp8 { src } => vec![P::Act(src), P::XCodes, P::XScales],
            Step::RopeKv { layer, qk_norm } => {
                let mut p = vec![
                    P::Act(Act::Q),
                    P::Act(Act::K),
                    P::Act(Act::V),
                    P::KCache(layer),
                    P::VCache(layer),
                    P::RopeCos,
                    P::RopeSin,
                    P::Pos,
                    P::Rows,
                ];
                if let Some(n) = qk_norm {
                    p.extend([P::Norm(n.q), P::Norm(n.k), P::Eps]);
                }
                p
            }
            Step::Attention { layer, .. } => vec![
                P::Act(Act::Q),
                P::KCache(layer),
                P::VCache(layer),
                P::Act(Act::Att),
                P::AttnPartials,
                P::Pos,
                P::Rows,
            ],
            Step::SiluMul { quant } => {
                let mut p = vec![P::Act(Act::Gate), P::Act(Act::Up), P::Rows];
                if quant {
                    p.extend([P::XCodes, P::XScales]);
                }
                p
            }
            Step::Moe { .. } => {
                unreachable!("a MoE step launches several kernels: Schedule::moe_launches")
            }
            Step::Argmax => vec![P::Act(Act::Logits), P::Next],
            Step::Linear {
                linear,
                src,
                dst,
                w8a8,
            } => {
                let mut p = vec![
                    P::LinearCodes(linear),
                    P::LinearScales(linear),
                    P::LinearGlobal(linear),
                    P::LinearBias(linear),
                ];
                if w8a8 {
                    p.extend([P::XCodes, P::XScales]);
                } else {
                    p.push(P::Act(src));
                }
                p.extend([P::Act(dst), P::Rows]);
                p
            }
        }
    }

    /// The first row a last-row RMSNorm reads in a pass of `m` rows (0 otherwise).
    pub fn row0(&self, m: usize) -> i32 {
        if self.rows(m) < m {
            m as i32 - 1
        } else {
            0
        }
    }

    /// Activation rows the step processes in a pass of `m` rows: one for the last-row RMSNorm
    /// and for a linear layer into the logits (only the last position's logits are kept).
    pub fn rows(&self, m: usize) -> usize {
        match *self {
            Step::RmsNorm { last_row: true, .. }
            | Step::Linear {
                dst: Act::Logits, ..
            } => 1,
            _ => m,
        }
    }
}
