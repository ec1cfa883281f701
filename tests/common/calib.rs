//! Synthetic calibrations for the planner tests: every linear layer of a model's graph (lm_head
//! included) with pseudo-random eps from a fixed seed, so plans are reproducible.

use std::collections::BTreeMap;

use fpx::calib::{Calibration, KlSetup, LayerCalibration, LayerMetrics, ModelRef, TextRef};
use fpx::formats::Format;
use fpx::model::{Architecture, ModelSpec};

/// SmolLM2-135M's hyper-parameters with `blocks` blocks.
pub fn smollm2_spec(blocks: usize) -> ModelSpec {
    ModelSpec {
        architecture: Architecture::Llama,
        hidden_size: 576,
        intermediate_size: 1536,
        num_layers: blocks,
        num_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
        vocab_size: 49152,
        rope_theta: 100000.0,
        rope_scaling: Default::default(),
        rms_norm_eps: 1e-5,
        tie_word_embeddings: true,
        attention_bias: false,
        max_position_embeddings: 8192,
        sliding_window: None,
        bos_token_id: None,
        eos_token_id: Default::default(),
        moe: None,
    }
}

/// A calibration of `spec`'s model: per layer and format (fp8, nvfp4, mxfp4) an eps of
/// `scale x (0.5 + u)` (u uniform from `seed`), eps_wa 1.5x, weight error 0.8x, and with
/// `with_kl` a KL of `0.1 eps^2`.
pub fn synthetic(spec: ModelSpec, with_kl: bool, seed: u64) -> Calibration {
    let mut seed = seed;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 11) as f64 / (1u64 << 53) as f64
    };
    let graph = fpx::ir::Graph::build(&spec);
    let layers = graph
        .linears()
        .map(|(id, l)| {
            let node = graph.node(id);
            let mut metrics = BTreeMap::new();
            for (f, scale) in [
                (Format::Fp8, 0.02),
                (Format::Nvfp4, 0.1),
                (Format::Mxfp4, 0.13),
            ] {
                let eps = scale * (0.5 + next());
                let kl = with_kl.then_some(eps * eps * 0.1);
                let m = LayerMetrics {
                    eps,
                    eps_wa: eps * 1.5,
                    weight_error: eps * 0.8,
                    kl,
                    kl_wa: None,
                };
                metrics.insert(f, m);
            }
            LayerCalibration {
                name: node.name.clone(),
                layer: node.layer.unwrap_or(spec.num_layers),
                kind: l.kind,
                out_features: l.out_features,
                in_features: l.in_features,
                metrics,
                tokens: None,
            }
        })
        .collect();
    Calibration {
        schema_version: fpx::calib::SCHEMA_VERSION,
        fpx_version: "test".into(),
        model: ModelRef {
            identity: "synthetic-identity".into(),
            path: "synthetic".into(),
        },
        spec,
        text: TextRef {
            sha256: "0".repeat(64),
            path: "synthetic.txt".into(),
            tokens: 1024,
        },
        seq_len: 256,
        windows: 4,
        formats: vec![Format::Fp8, Format::Nvfp4, Format::Mxfp4],
        mx_scale_rule: fpx::formats::MxScaleRule::Round,
        kl: with_kl.then_some(KlSetup {
            activations: false,
            seq_len: 256,
            windows: 1,
            tokens: 255,
        }),
        layers,
    }
}
