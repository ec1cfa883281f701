//! Builds the decoder graph of a [`ModelSpec`], node by node, in execution order.

use petgraph::graph::{DiGraph, NodeIndex};

use super::ops::{Linear, LinearKind, Node, Op};
use crate::model::moe::{MoeNames, MoeSpec};
use crate::model::ModelSpec;

struct Builder {
    graph: DiGraph<Node, usize>,
}

impl Builder {
    fn add(
        &mut self,
        name: String,
        layer: Option<usize>,
        op: Op,
        inputs: &[NodeIndex],
    ) -> NodeIndex {
        let id = self.graph.add_node(Node { name, layer, op });
        for (slot, &src) in inputs.iter().enumerate() {
            self.graph.add_edge(src, id, slot);
        }
        id
    }

    fn rms_norm(
        &mut self,
        name: String,
        layer: Option<usize>,
        dim: usize,
        eps: f32,
        x: NodeIndex,
    ) -> NodeIndex {
        let tensor = format!("{name}.weight");
        self.add(name, layer, Op::RmsNorm { tensor, dim, eps }, &[x])
    }

    fn linear(
        &mut self,
        name: String,
        layer: Option<usize>,
        kind: LinearKind,
        (in_features, out_features): (usize, usize),
        bias: bool,
        x: NodeIndex,
    ) -> NodeIndex {
        let op = Op::Linear(Linear {
            weight: format!("{name}.weight"),
            bias: bias.then(|| format!("{name}.bias")),
            in_features,
            out_features,
            kind,
            expert: None,
        });
        self.add(name, layer, op, &[x])
    }

    /// The dense SiLU-gated MLP `down(silu(gate(x)) * up(x))` of `ffn` rows, its projections
    /// named `{prefix}.{gate,up,down}` (the last name component is a projection name of
    /// `names`), returning the down projection.
    fn mlp(
        &mut self,
        [gate, up, down]: [String; 3],
        layer: Option<usize>,
        (h, ffn): (usize, usize),
        expert: Option<usize>,
        x: NodeIndex,
    ) -> NodeIndex {
        let act = format!("{}.act", gate.rsplit_once('.').map_or("", |(p, _)| p));
        let g = self.linear(gate, layer, LinearKind::Gate, (h, ffn), false, x);
        let u = self.linear(up, layer, LinearKind::Up, (h, ffn), false, x);
        let a = self.add(act, layer, Op::SiluMul { dim: ffn }, &[g, u]);
        let d = self.linear(down, layer, LinearKind::Down, (ffn, h), false, a);
        if expert.is_some() {
            for id in [g, u, d] {
                if let Op::Linear(l) = &mut self.graph[id].op {
                    l.expert = expert;
                }
            }
        }
        d
    }

    /// A MoE block on `x` (router, each expert's rows and MLP, the weighted combine),
    /// returning the combine.
    fn moe(&mut self, spec: &ModelSpec, moe: &MoeSpec, layer: usize, x: NodeIndex) -> NodeIndex {
        let names = MoeNames::of(spec.architecture).expect("MoE specs have MoE names");
        let l = Some(layer);
        let h = spec.hidden_size;
        let router_name = names.router(layer);
        let router = Op::Router {
            tensor: format!("{router_name}.weight"),
            hidden: h,
            experts: moe.experts,
            top_k: moe.top_k,
            norm_top_k: moe.norm_top_k,
        };
        let router = self.add(router_name, l, router, &[x]);
        let mut inputs = vec![router];
        for e in 0..moe.experts {
            let projections = names.expert(layer, e);
            let rows_name = format!(
                "{}.rows",
                projections[0].rsplit_once('.').map_or("", |(p, _)| p)
            );
            let rows = self.add(rows_name, l, Op::ExpertRows { expert: e }, &[x, router]);
            inputs.push(self.mlp(projections, l, (h, moe.expert_ffn), Some(e), rows));
        }
        let combine = Op::MoeCombine {
            experts: moe.experts,
            dim: h,
        };
        let name = format!("model.layers.{layer}.{}.combine", names.block);
        self.add(name, l, combine, &inputs)
    }
}

pub(super) fn build(spec: &ModelSpec) -> DiGraph<Node, usize> {
    let mut b = Builder {
        graph: DiGraph::new(),
    };
    let (h, ffn, hd) = (spec.hidden_size, spec.intermediate_size, spec.head_dim);
    let (q_dim, kv_dim) = (spec.num_heads * hd, spec.num_kv_heads * hd);
    let eps = spec.rms_norm_eps;
    let embed = "model.embed_tokens".to_string();
    let mut x = b.add(
        embed.clone(),
        None,
        Op::Embedding {
            tensor: format!("{embed}.weight"),
            vocab: spec.vocab_size,
            hidden: h,
        },
        &[],
    );
    for i in 0..spec.num_layers {
        let l = Some(i);
        let p = format!("model.layers.{i}");
        let xn = b.rms_norm(format!("{p}.input_layernorm"), l, h, eps, x);
        let bias = spec.attention_bias;
        let att = format!("{p}.self_attn");
        // Qwen3: each head of q and k RMS-normalised before RoPE.
        let head_norm = |b: &mut Builder, which: &str, heads: usize, x: NodeIndex| {
            if !spec.qk_norm() {
                return x;
            }
            let name = format!("{att}.{which}_norm");
            let op = Op::HeadNorm {
                tensor: format!("{name}.weight"),
                heads,
                head_dim: hd,
                eps,
            };
            b.add(name, l, op, &[x])
        };
        let q = b.linear(
            format!("{att}.q_proj"),
            l,
            LinearKind::Q,
            (h, q_dim),
            bias,
            xn,
        );
        let q = head_norm(&mut b, "q", spec.num_heads, q);
        let k = b.linear(
            format!("{att}.k_proj"),
            l,
            LinearKind::K,
            (h, kv_dim),
            bias,
            xn,
        );
        let k = head_norm(&mut b, "k", spec.num_kv_heads, k);
        let v = b.linear(
            format!("{att}.v_proj"),
            l,
            LinearKind::V,
            (h, kv_dim),
            bias,
            xn,
        );
        let rope = |heads| Op::Rope {
            heads,
            head_dim: hd,
            theta: spec.rope_theta,
        };
        let q = b.add(format!("{att}.rope_q"), l, rope(spec.num_heads), &[q]);
        let k = b.add(format!("{att}.rope_k"), l, rope(spec.num_kv_heads), &[k]);
        let attention = Op::Attention {
            heads: spec.num_heads,
            kv_heads: spec.num_kv_heads,
            head_dim: hd,
            window: spec.attention_window(i),
        };
        let a = b.add(format!("{att}.attention"), l, attention, &[q, k, v]);
        let o = b.linear(
            format!("{att}.o_proj"),
            l,
            LinearKind::O,
            (q_dim, h),
            spec.o_proj_bias(),
            a,
        );
        x = b.add(format!("{p}.residual_attn"), l, Op::Add { dim: h }, &[x, o]);

        let xn = b.rms_norm(format!("{p}.post_attention_layernorm"), l, h, eps, x);
        let down = match spec.moe_of(i) {
            Some(moe) => b.moe(spec, moe, i, xn),
            None => {
                let names = ["gate_proj", "up_proj", "down_proj"].map(|n| format!("{p}.mlp.{n}"));
                b.mlp(names, l, (h, ffn), None, xn)
            }
        };
        x = b.add(
            format!("{p}.residual_mlp"),
            l,
            Op::Add { dim: h },
            &[x, down],
        );
    }
    let xn = b.rms_norm("model.norm".to_string(), None, h, eps, x);
    let lm_weight = if spec.tie_word_embeddings {
        "model.embed_tokens.weight".to_string()
    } else {
        "lm_head.weight".to_string()
    };
    let lm_head = Op::Linear(Linear {
        weight: lm_weight,
        bias: None,
        in_features: h,
        out_features: spec.vocab_size,
        kind: LinearKind::LmHead,
        expert: None,
    });
    b.add("lm_head".to_string(), None, lm_head, &[xn]);
    b.graph
}
