//! Node and op types of the graph IR: a closed set of ops as an enum.

use serde::Serialize;

/// One node: its Hugging Face module name and its op.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Node {
    pub name: String,
    /// Decoder block the node belongs to (`None` for embedding, final norm, lm_head).
    pub layer: Option<usize>,
    pub op: Op,
}

/// The ops of a decoder forward pass. Operand slots are listed per op.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Gathers rows of `[vocab, hidden]` by token id. No operands (the token ids).
    Embedding {
        tensor: String,
        vocab: usize,
        hidden: usize,
    },
    /// `x * rsqrt(mean(x^2) + eps) * weight`. Operand 0: x.
    RmsNorm {
        tensor: String,
        dim: usize,
        eps: f32,
    },
    /// [`Op::RmsNorm`] of each of the `heads` heads of `head_dim` in a row, with one weight
    /// of `head_dim` shared by the heads (Qwen3's `q_norm` / `k_norm`). Operand 0: q or k.
    HeadNorm {
        tensor: String,
        heads: usize,
        head_dim: usize,
        eps: f32,
    },
    /// `y = x W^T (+ b)`. Operand 0: x.
    Linear(Linear),
    /// Rotary embedding (rotate-half convention) on `heads` heads of `head_dim`. Operand 0: q or k.
    Rope {
        heads: usize,
        head_dim: usize,
        theta: f32,
    },
    /// Causal grouped-query attention. Operands: 0 q, 1 k, 2 v (RoPE already applied).
    /// `window`: a query sees only the last `window` positions, its own included
    /// ([`crate::model::window`]); `None`: the whole context.
    Attention {
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        #[serde(skip_serializing_if = "Option::is_none")]
        window: Option<usize>,
    },
    /// `silu(gate) * up`. Operands: 0 gate, 1 up.
    SiluMul { dim: usize },
    /// A MoE block's router ([`crate::model::moe`]): scores `x R^T` with `tensor`
    /// (`[experts, hidden]`, kept in FP32, as the engines keep it), softmax over the experts,
    /// the `top_k` largest probabilities (divided by their sum with `norm_top_k`). Its value is
    /// each token's experts and weights. Operand 0: x.
    Router {
        tensor: String,
        hidden: usize,
        experts: usize,
        top_k: usize,
        norm_top_k: bool,
    },
    /// The rows of x routed to `expert`: the input of that expert's gate and up projections.
    /// Operands: 0 x, 1 the router.
    ExpertRows { expert: usize },
    /// The MoE block's output: each token's sum over its experts of routing weight times that
    /// expert's down projection. Operands: 0 the router, then expert 0..`experts`'s down.
    MoeCombine { experts: usize, dim: usize },
    /// Residual add. Operands: 0 residual stream, 1 branch output.
    Add { dim: usize },
}

/// What a linear layer is, by its role in the block.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum LinearKind {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
    LmHead,
}

impl LinearKind {
    pub fn name(self) -> &'static str {
        match self {
            LinearKind::Q => "q",
            LinearKind::K => "k",
            LinearKind::V => "v",
            LinearKind::O => "o",
            LinearKind::Gate => "gate",
            LinearKind::Up => "up",
            LinearKind::Down => "down",
            LinearKind::LmHead => "lm_head",
        }
    }
}

/// A linear layer: names of its tensors and its shape.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Linear {
    /// Weight tensor name, row-major `[out_features, in_features]`.
    pub weight: String,
    pub bias: Option<String>,
    pub in_features: usize,
    pub out_features: usize,
    pub kind: LinearKind,
    /// The expert of a MoE block this projection belongs to (its input: the tokens routed
    /// to it, [`Op::ExpertRows`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expert: Option<usize>,
}

impl Linear {
    pub fn params(&self) -> usize {
        self.in_features * self.out_features
    }
}
