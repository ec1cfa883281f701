//! The graph IR: structure of a built decoder, name lookup, and a committed snapshot of the
//! text dump (a change to the graph shows up as a reviewed snapshot diff).

use fpx::ir::{Graph, LinearKind, Op};
use fpx::model::synthetic::tiny_spec;
use fpx::model::Architecture;

#[test]
fn decoder_graph_has_every_op_of_every_block() {
    let spec = tiny_spec(Architecture::Qwen2);
    let g = Graph::build(&spec);
    // embedding + 15 nodes per block + final norm + lm_head
    assert_eq!(g.node_count(), 1 + 15 * spec.num_layers + 2);
    assert_eq!(g.linears().count(), 7 * spec.num_layers + 1);
    assert_eq!(g.block_linears().count(), 7 * spec.num_layers);
    let q = g.find("model.layers.1.self_attn.q_proj").unwrap();
    let Op::Linear(l) = &g.node(q).op else {
        panic!("q_proj is a linear")
    };
    assert_eq!(
        (l.kind, l.out_features, l.in_features),
        (LinearKind::Q, 64, 64)
    );
    assert_eq!(
        l.bias.as_deref(),
        Some("model.layers.1.self_attn.q_proj.bias")
    );
    assert_eq!(g.node(q).layer, Some(1));
    // Attention reads q and k through RoPE and v directly, in slot order.
    let att = g.find("model.layers.0.self_attn.attention").unwrap();
    let names: Vec<&str> = g
        .inputs(att)
        .into_iter()
        .map(|i| g.node(i).name.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "model.layers.0.self_attn.rope_q",
            "model.layers.0.self_attn.rope_k",
            "model.layers.0.self_attn.v_proj"
        ]
    );
    assert_eq!(g.block_input(1), g.block_output(0));
    assert_eq!(g.node(g.output()).name, "lm_head");
    // Untied lm_head reads its own tensor; a tied one reads the embedding.
    let Op::Linear(head) = &g.node(g.output()).op else {
        panic!()
    };
    assert_eq!(head.weight, "lm_head.weight");
    let tied = Graph::build(&tiny_spec(Architecture::Llama));
    let Op::Linear(head) = &tied.node(tied.output()).op else {
        panic!()
    };
    assert_eq!(head.weight, "model.embed_tokens.weight");
}

#[test]
fn graph_dump_snapshot() {
    insta::assert_snapshot!(Graph::build(&tiny_spec(Architecture::Llama)).dump());
}

#[test]
fn qwen3_normalises_q_and_k_per_head_before_rope_and_windows_its_attention() {
    let spec = fpx::model::ModelSpec {
        sliding_window: Some(fpx::model::SlidingWindow {
            size: 6,
            layers: vec![1],
        }),
        ..tiny_spec(Architecture::Qwen3)
    };
    let g = Graph::build(&spec);
    // Two more nodes per block than Qwen2: q_norm and k_norm.
    assert_eq!(g.node_count(), 1 + 17 * spec.num_layers + 2);
    for (which, heads) in [("q", spec.num_heads), ("k", spec.num_kv_heads)] {
        let norm = g
            .find(&format!("model.layers.0.self_attn.{which}_norm"))
            .unwrap();
        assert_eq!(
            g.node(norm).op,
            Op::HeadNorm {
                tensor: format!("model.layers.0.self_attn.{which}_norm.weight"),
                heads,
                head_dim: 16,
                eps: spec.rms_norm_eps,
            }
        );
        let input = g.inputs(norm)[0];
        assert_eq!(
            g.node(input).name,
            format!("model.layers.0.self_attn.{which}_proj")
        );
        let rope = g
            .find(&format!("model.layers.0.self_attn.rope_{which}"))
            .unwrap();
        assert_eq!(g.inputs(rope), [norm]);
    }
    let window = |layer: usize| {
        let att = g
            .find(&format!("model.layers.{layer}.self_attn.attention"))
            .unwrap();
        match g.node(att).op {
            Op::Attention { window, .. } => window,
            _ => unreachable!(),
        }
    };
    assert_eq!((window(0), window(1)), (None, Some(6)));
    let dump = g.dump();
    assert!(
        dump.contains("q_norm = head_norm heads=4 head_dim=16"),
        "{dump}"
    );
    assert!(dump.contains("head_dim=16 window=6 ("), "{dump}");
    // No biases on Qwen3's projections.
    assert!(g.linears().all(|(_, l)| l.bias.is_none()));
}
