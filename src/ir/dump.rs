//! Stable text dump of a graph: one line per node in topological order, operands by name.
//! Used by `fpx inspect --graph` and as a snapshot in tests.

use std::fmt::Write;

use super::{Graph, Op};

pub(super) fn dump(graph: &Graph) -> String {
    let mut out = String::new();
    for (i, &id) in graph.topo_order().iter().enumerate() {
        let node = graph.node(id);
        let inputs: Vec<&str> = graph
            .inputs(id)
            .into_iter()
            .map(|src| graph.node(src).name.as_str())
            .collect();
        let detail = match &node.op {
            Op::Embedding { vocab, hidden, .. } => format!("embedding [{vocab}, {hidden}]"),
            Op::RmsNorm { dim, eps, .. } => format!("rms_norm dim={dim} eps={eps:e}"),
            Op::HeadNorm {
                heads,
                head_dim,
                eps,
                ..
            } => format!("head_norm heads={heads} head_dim={head_dim} eps={eps:e}"),
            Op::Linear(l) => format!(
                "linear.{} [{}, {}]{}",
                l.kind.name(),
                l.out_features,
                l.in_features,
                if l.bias.is_some() { " +bias" } else { "" }
            ),
            Op::Rope {
                heads,
                head_dim,
                theta,
            } => {
                format!("rope heads={heads} head_dim={head_dim} theta={theta}")
            }
            Op::Attention {
                heads,
                kv_heads,
                head_dim,
                window,
            } => {
                let w = window.map_or(String::new(), |w| format!(" window={w}"));
                format!("attention heads={heads} kv_heads={kv_heads} head_dim={head_dim}{w}")
            }
            Op::SiluMul { dim } => format!("silu_mul dim={dim}"),
            Op::Add { dim } => format!("add dim={dim}"),
            Op::Router {
                experts,
                top_k,
                norm_top_k,
                ..
            } => {
                let norm = if *norm_top_k { " normalised" } else { "" };
                format!("router experts={experts} top_k={top_k}{norm}")
            }
            Op::ExpertRows { expert } => format!("expert_rows expert={expert}"),
            Op::MoeCombine { experts, dim } => format!("moe_combine experts={experts} dim={dim}"),
        };
        let _ = writeln!(out, "%{i} {} = {detail} ({})", node.name, inputs.join(", "));
    }
    out
}
