//! Writes the seed corpora of the fuzz targets (`fuzz/corpus/TARGET/seed-*`): one small
//! valid input of each kind, made with fpx's own writers (synthetic GGUF and safetensors
//! checkpoints) or written out here (calibration, plan, profile, pins):
//! `cargo run --example fuzz_seeds`. The committed corpus is replayed by
//! `tests/fuzz_corpus.rs`.

use std::path::Path;

use fpx::model::synthetic::{tiny_spec, write_gguf, write_hf_checkpoint, GgmlDType, HfDtype};
use fpx::model::{Architecture, ModelSpec};
use serde_json::json;

fn put(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
}

/// A one-block model, small enough that the fuzzer mutates mostly header bytes.
fn small(arch: Architecture) -> ModelSpec {
    ModelSpec {
        hidden_size: 32,
        intermediate_size: 32,
        num_layers: 1,
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: 16,
        vocab_size: 280,
        ..tiny_spec(arch)
    }
}

fn main() {
    let tmp = std::env::temp_dir().join(format!("fpx-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    for (arch, name) in [
        (Architecture::Llama, "llama"),
        (Architecture::Qwen2, "qwen2"),
    ] {
        let gguf = tmp.join(format!("{name}.gguf"));
        write_gguf(&gguf, &small(arch), 1, GgmlDType::Q4_0).unwrap();
        let bytes = std::fs::read(&gguf).unwrap();
        put("gguf_header", name, &bytes);
        put("gguf_tokenizer", name, &bytes);
        let hf = tmp.join(name);
        write_hf_checkpoint(&hf, &small(arch), 1, HfDtype::F16, 2).unwrap();
        put(
            "config_json",
            name,
            &std::fs::read(hf.join("config.json")).unwrap(),
        );
        put(
            "safetensors_index",
            name,
            &std::fs::read(hf.join("model.safetensors.index.json")).unwrap(),
        );
        let mut shards: Vec<_> = std::fs::read_dir(&hf)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        shards.sort();
        put(
            "safetensors_header",
            name,
            &std::fs::read(&shards[0]).unwrap(),
        );
    }
    std::fs::remove_dir_all(&tmp).unwrap();

    let metrics = json!({"eps": 0.01, "eps_wa": 0.02, "weight_error": 0.03, "kl": 0.001});
    let calib = json!({
        "schema_version": fpx::calib::SCHEMA_VERSION, "fpx_version": "0.1.0",
        "model": {"identity": "ab12", "path": "m.gguf"},
        "spec": serde_json::to_value(ModelSpec {
            hidden_size: 32,
            intermediate_size: 32,
            num_layers: 1,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 8,
            ..tiny_spec(Architecture::Llama)
        })
        .unwrap(),
        "text": {"sha256": "cd34", "path": "t.txt", "tokens": 128},
        "seq_len": 64, "windows": 2, "formats": ["fp8", "nvfp4"], "mx_scale_rule": "round",
        "kl": {"seq_len": 32, "windows": 1, "tokens": 31},
        "layers": [
            {"name": "model.layers.0.self_attn.q_proj", "layer": 0, "kind": "q",
             "out_features": 32, "in_features": 32,
             "metrics": {"fp8": metrics, "nvfp4": metrics}},
            {"name": "model.layers.0.mlp.down_proj", "layer": 0, "kind": "down",
             "out_features": 32, "in_features": 32,
             "metrics": {"fp8": metrics, "nvfp4": metrics}}
        ]
    });
    put(
        "calibration",
        "two-layers",
        &serde_json::to_vec_pretty(&calib).unwrap(),
    );
    let plan_v1 = json!({
        "schema_version": 1, "model": "ab12",
        "layers": [{"name": "model.layers.0.self_attn.q_proj", "format": "nvfp4"},
                   {"name": "model.layers.0.mlp.down_proj", "format": "fp8",
                    "activations": "fp8"}]
    });
    put("plan", "v1", &serde_json::to_vec_pretty(&plan_v1).unwrap());
    put(
        "plan",
        "smollm2-ilp",
        &std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("plans/smollm2-ilp-gamma0.5-h100.plan.json"),
        )
        .unwrap(),
    );
    let profile = json!({
        "schema_version": 1, "device": "NVIDIA H100", "batch": 1, "context": 512,
        "model": "ab12", "other_seconds": 0.0004,
        "layers": {"model.layers.0.self_attn.q_proj": {"fp8": 2e-6, "nvfp4": 1.5e-6}}
    });
    put(
        "profile",
        "one-layer",
        &serde_json::to_vec_pretty(&profile).unwrap(),
    );
    put(
        "pins",
        "rules",
        b"[[pin]]\nname = 'lm_head'\nformat = 'fp8'\n\n[[pin]]\nlayers = '0-3'\nkinds = ['q', 'k']\nformat = 'nvfp4'\n",
    );
}
