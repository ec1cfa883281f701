//! `fpx inspect MODEL`: the architecture and its settings (RoPE, attention windows, norms,
//! end-of-sequence ids), every linear layer with its shape and weight bytes per format, and
//! the model's identity; `--json` has the same, `--graph` prints the IR.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use serde::Serialize;

use fpx::formats::Format;
use fpx::ir::{Graph, Op};
use fpx::model::ModelSpec;

use crate::{emit, load};

#[derive(Args)]
pub struct InspectArgs {
    /// Hugging Face model directory or GGUF file.
    model: PathBuf,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
    /// Print the graph IR, one node per line.
    #[arg(long, conflicts_with = "json")]
    graph: bool,
}

#[derive(Serialize)]
struct LinearRow {
    name: String,
    layer: Option<usize>,
    kind: &'static str,
    /// The MoE expert the projection belongs to.
    #[serde(skip_serializing_if = "Option::is_none")]
    expert: Option<usize>,
    out_features: usize,
    in_features: usize,
    params: usize,
    bytes: BTreeMap<Format, u64>,
}

/// The RMSNorms of the model, one row per kind (the per-layer ones counted).
#[derive(Serialize)]
struct NormRow {
    /// Module name with the layer index as `N` (`model.layers.N.self_attn.q_norm`).
    name: String,
    /// Elements the norm's weight has (`hidden`, or `head_dim` for a per-head norm).
    dim: usize,
    /// Whether it normalises each head of its input on its own (q_norm / k_norm).
    per_head: bool,
    /// Layers that have it (1 for the final norm).
    count: usize,
    eps: f32,
}

#[derive(Serialize)]
struct InspectReport<'a> {
    path: String,
    identity: &'a str,
    spec: &'a ModelSpec,
    graph_nodes: usize,
    norms: Vec<NormRow>,
    linears: Vec<LinearRow>,
    total_bytes: BTreeMap<Format, u64>,
}

fn norms(graph: &Graph) -> Vec<NormRow> {
    let mut rows: Vec<NormRow> = Vec::new();
    for &id in graph.topo_order() {
        let node = graph.node(id);
        let (dim, per_head, eps) = match node.op {
            Op::RmsNorm { dim, eps, .. } => (dim, false, eps),
            Op::HeadNorm { head_dim, eps, .. } => (head_dim, true, eps),
            _ => continue,
        };
        let name = match node.layer {
            Some(l) => node
                .name
                .replacen(&format!("model.layers.{l}."), "model.layers.N.", 1),
            None => node.name.clone(),
        };
        match rows.iter_mut().find(|r| r.name == name) {
            Some(r) => r.count += 1,
            None => rows.push(NormRow {
                name,
                dim,
                per_head,
                count: 1,
                eps,
            }),
        }
    }
    rows
}

/// The parameters of a RoPE scaling, as ` {json}` (nothing for the default).
fn params(s: &fpx::model::rope::RopeScaling) -> String {
    match serde_json::to_value(s) {
        Ok(serde_json::Value::Object(mut m)) => {
            m.remove("rope_type");
            if m.is_empty() {
                String::new()
            } else {
                format!(" {}", serde_json::Value::Object(m))
            }
        }
        _ => String::new(),
    }
}

/// One line each for RoPE, attention and the end-of-sequence ids.
fn settings(s: &ModelSpec) -> String {
    let rope = match &s.rope_scaling {
        fpx::model::rope::RopeScaling::Factors { factors } => {
            format!("factors (GGUF rope_freqs, {} values)", factors.len())
        }
        other => other.rope_type().to_string() + &params(other),
    };
    let attention = match &s.sliding_window {
        None => "full causal on every layer".to_string(),
        Some(w) if w.layers.len() == s.num_layers => {
            format!("sliding window of {} positions on every layer", w.size)
        }
        Some(w) => format!(
            "sliding window of {} positions on {} of {} layers ({:?}), full causal on the rest",
            w.size,
            w.layers.len(),
            s.num_layers,
            w.layers
        ),
    };
    let mlp = match &s.moe {
        None => "dense SiLU-gated".to_string(),
        Some(m) => format!(
            "mixture of experts: {} experts of {} per block, top-{}{}, router in FP32; dense \
             MLP on layers {:?}",
            m.experts,
            m.expert_ffn,
            m.top_k,
            if m.norm_top_k { " renormalised" } else { "" },
            m.dense_layers
        ),
    };
    format!(
        "rope theta {} scaling {rope}\nattention {attention}\nmlp {mlp}\nbos {}  eos {:?}\n",
        s.rope_theta,
        s.bos_token_id.map_or("none".to_string(), |b| b.to_string()),
        s.eos_token_id.ids()
    )
}

pub fn run(args: InspectArgs) -> Result<()> {
    let model = load(&args.model)?;
    let graph = Graph::build(&model.spec);
    if args.graph {
        emit(&graph.dump());
        return Ok(());
    }
    let linears: Vec<LinearRow> = graph
        .linears()
        .map(|(id, l)| {
            let node = graph.node(id);
            LinearRow {
                name: node.name.clone(),
                layer: node.layer,
                kind: l.kind.name(),
                expert: l.expert,
                out_features: l.out_features,
                in_features: l.in_features,
                params: l.params(),
                bytes: Format::ALL
                    .iter()
                    .map(|&f| (f, f.weight_bytes(l.out_features, l.in_features)))
                    .collect(),
            }
        })
        .collect();
    let total_bytes = Format::ALL
        .iter()
        .map(|&f| (f, linears.iter().map(|l| l.bytes[&f]).sum()))
        .collect();
    let report = InspectReport {
        path: args.model.display().to_string(),
        identity: &model.identity,
        spec: &model.spec,
        graph_nodes: graph.node_count(),
        norms: norms(&graph),
        linears,
        total_bytes,
    };
    if args.json {
        emit(&(serde_json::to_string_pretty(&report)? + "\n"));
        return Ok(());
    }
    let mut text = String::new();
    let s = report.spec;
    writeln!(text, "{}  ({:?})", report.path, s.architecture)?;
    writeln!(
        text,
        "layers {}  hidden {}  ffn {}  heads {} / kv {}  head_dim {}  vocab {}  tied embeddings {}",
        s.num_layers,
        s.hidden_size,
        s.intermediate_size,
        s.num_heads,
        s.num_kv_heads,
        s.head_dim,
        s.vocab_size,
        s.tie_word_embeddings
    )?;
    text.push_str(&settings(s));
    writeln!(text, "identity {}", report.identity)?;
    writeln!(
        text,
        "graph: {} nodes, {} linear layers\n",
        report.graph_nodes,
        report.linears.len()
    )?;
    writeln!(
        text,
        "{:<42} {:>8} {:>8} {:>7} {:>8}",
        "norm", "dim", "per head", "layers", "eps"
    )?;
    for n in &report.norms {
        writeln!(
            text,
            "{:<42} {:>8} {:>8} {:>7} {:>8.1e}",
            n.name,
            n.dim,
            if n.per_head { "yes" } else { "no" },
            n.count,
            n.eps
        )?;
    }
    writeln!(text)?;
    writeln!(
        text,
        "{:<42} {:>5} {:>7} {:>13} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "linear", "layer", "kind", "shape", "params", "fp16", "fp8", "nvfp4", "mxfp4"
    )?;
    for l in &report.linears {
        let layer = l.layer.map_or("-".to_string(), |v| v.to_string());
        let shape = format!("{}x{}", l.out_features, l.in_features);
        write!(
            text,
            "{:<42} {:>5} {:>7} {:>13} {:>10}",
            l.name, layer, l.kind, shape, l.params
        )?;
        for f in Format::ALL {
            write!(text, " {:>10}", l.bytes[&f])?;
        }
        writeln!(text)?;
    }
    write!(
        text,
        "{:<42} {:>5} {:>7} {:>13} {:>10}",
        "total",
        "",
        "",
        "",
        report.linears.iter().map(|l| l.params).sum::<usize>()
    )?;
    for f in Format::ALL {
        write!(text, " {:>10}", report.total_bytes[&f])?;
    }
    writeln!(text)?;
    emit(&text);
    Ok(())
}
