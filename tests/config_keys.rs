//! No config.json key silently ignored: every key that changes the computation, fed a value
//! fpx does not implement, is refused with an error naming the key (and the file); keys that
//! change nothing load. See `src/model/config_keys.rs` for the table.

use std::path::Path;

use fpx::model::config::HfConfig;
use fpx::model::rope::RopeScaling;
use fpx::model::{Architecture, ModelSpec};
use serde_json::{json, Value};

mod common;

fn llama() -> Value {
    common::tiny_llama_config()
}

fn load(v: &Value) -> fpx::Result<ModelSpec> {
    let path = Path::new("m/config.json");
    let raw = HfConfig::parse(v.to_string().as_bytes(), path)?;
    ModelSpec::try_from(raw).map_err(|e| e.at(path))
}

/// `base` with `key` (a dotted path into nested dicts) set to `value`.
fn with(base: &Value, key: &str, value: Value) -> Value {
    let mut v = base.clone();
    let mut at = &mut v;
    let parts: Vec<&str> = key.split('.').collect();
    for p in &parts[..parts.len() - 1] {
        if at.get(*p).is_none_or(Value::is_null) {
            at[*p] = json!({});
        }
        at = &mut at[*p];
    }
    at[parts[parts.len() - 1]] = value;
    v
}

fn llama3() -> Value {
    json!({
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64
    })
}

#[test]
fn every_key_that_changes_the_computation_refuses_what_fpx_does_not_implement() {
    let base = llama();
    let scaled = with(&base, "rope_scaling", llama3());
    let mistral = with(
        &with(&base, "architectures", json!(["MistralForCausalLM"])),
        "model_type",
        json!("mistral"),
    );
    // (config, key the error must name, text it must contain)
    let cases: Vec<(Value, &str, &str)> = vec![
        (
            with(&base, "hidden_act", json!("gelu")),
            "hidden_act",
            "\"gelu\"",
        ),
        (with(&base, "mlp_bias", json!(true)), "mlp_bias", "true"),
        (
            with(&base, "rope_scaling.rope_type", json!("longrope")),
            "rope_scaling.rope_type",
            "\"longrope\" is not supported",
        ),
        (
            with(
                &with(&base, "rope_scaling.type", json!("yarn")),
                "rope_scaling.beta_fast",
                json!(-1.0),
            ),
            "rope_scaling.beta_fast",
            "must be positive",
        ),
        (
            with(
                &with(&base, "rope_scaling.type", json!("yarn")),
                "rope_scaling.truncate",
                json!("yes"),
            ),
            "rope_scaling.truncate",
            "not a boolean",
        ),
        (
            with(&base, "rope_scaling.type", json!("dynamic")),
            "rope_scaling.factor",
            "is required",
        ),
        (
            with(&base, "rope_parameters.rope_type", json!("proportional")),
            "rope_parameters.rope_type",
            "\"proportional\"",
        ),
        (
            with(&base, "rope_scaling", json!(8)),
            "rope_scaling",
            "not an object",
        ),
        (
            with(&base, "rope_scaling", json!({"type": "linear"})),
            "rope_scaling.factor",
            "required",
        ),
        (
            with(&scaled, "rope_scaling.factor", json!("eight")),
            "rope_scaling.factor",
            "not a number",
        ),
        (
            with(&scaled, "rope_scaling.factor", json!(0.0)),
            "rope_scaling.factor",
            "positive",
        ),
        (
            with(&scaled, "rope_scaling.high_freq_factor", json!(0.5)),
            "rope_scaling.high_freq_factor",
            "greater than",
        ),
        (
            with(&scaled, "rope_scaling.low_freq_factor", json!(null)),
            "rope_scaling.low_freq_factor",
            "required",
        ),
        (
            with(
                &scaled,
                "rope_scaling.original_max_position_embeddings",
                json!(1.5),
            ),
            "rope_scaling.original_max_position_embeddings",
            "positive integer",
        ),
        (
            with(
                &base,
                "rope_parameters",
                json!({"full_attention": {"rope_type": "default"},
                       "sliding_attention": {"rope_type": "linear", "factor": 2.0}}),
            ),
            "rope_parameters",
            "one RoPE for every layer",
        ),
        (
            with(&base, "partial_rotary_factor", json!(0.5)),
            "partial_rotary_factor",
            "0.5",
        ),
        (
            with(&base, "rope_parameters.partial_rotary_factor", json!(0.25)),
            "partial_rotary_factor",
            "0.25",
        ),
        (
            with(&base, "rope_theta", json!(-1.0)),
            "rope_theta",
            "positive",
        ),
        (
            with(&mistral, "sliding_window", json!(0)),
            "sliding_window = 0",
            "at least one position",
        ),
        (
            with(
                &base,
                "layer_types",
                json!(["full_attention", "chunked_attention"]),
            ),
            "layer_types",
            "\"chunked_attention\"",
        ),
        (with(&base, "hidden_size", json!(0)), "hidden_size", "> 0"),
        (
            with(&base, "intermediate_size", json!(0)),
            "intermediate_size",
            "> 0",
        ),
        (
            with(&base, "num_hidden_layers", json!(0)),
            "num_hidden_layers",
            "> 0",
        ),
        (
            with(&base, "num_attention_heads", json!(0)),
            "num_attention_heads",
            "> 0",
        ),
        (
            with(&base, "num_key_value_heads", json!(3)),
            "num_key_value_heads",
            "multiple",
        ),
        (with(&base, "head_dim", json!(15)), "head_dim", "even"),
        (with(&base, "vocab_size", json!(0)), "vocab_size", "> 0"),
        (
            with(&base, "max_position_embeddings", json!(0)),
            "max_position_embeddings",
            "> 0",
        ),
        (
            with(&base, "rms_norm_eps", json!(0.0)),
            "rms_norm_eps",
            "positive",
        ),
        (
            with(&base, "eos_token_id", json!([0, 300])),
            "eos_token_id",
            "300",
        ),
        (
            with(&base, "bos_token_id", json!(999)),
            "bos_token_id",
            "999",
        ),
        (
            with(&base, "architectures", json!(["DeepseekV3ForCausalLM"])),
            "DeepseekV3ForCausalLM",
            "unsupported architecture",
        ),
        // Mixture of experts: a dense architecture with an expert key, and values the
        // router cannot take.
        (
            with(&base, "num_experts", json!(8)),
            "num_experts",
            "dense architecture",
        ),
        (
            with(
                &with(&base, "architectures", json!(["MixtralForCausalLM"])),
                "norm_topk_prob",
                json!(false),
            ),
            "norm_topk_prob = false",
            "always renormalises",
        ),
        (
            with(
                &with(&base, "architectures", json!(["Qwen3MoeForCausalLM"])),
                "num_experts_per_tok",
                json!(200),
            ),
            "num_experts_per_tok 200",
            "between 1 and num_experts",
        ),
        (
            with(
                &with(&base, "architectures", json!(["Qwen3MoeForCausalLM"])),
                "mlp_only_layers",
                json!([5]),
            ),
            "layer 5",
            "outside",
        ),
    ];
    for (config, key, text) in &cases {
        let err = match load(config) {
            Ok(spec) => panic!("{key}: accepted {config} as {spec:?}"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains(key) && err.contains(text) && err.starts_with("m/config.json"),
            "{key}: error `{err}` should name it and say `{text}`"
        );
    }
}

#[test]
fn supported_values_and_harmless_keys_load() {
    let base = llama();
    let spec = load(&with(&base, "rope_scaling", llama3())).unwrap();
    assert_eq!(
        spec.rope_scaling,
        RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64
        }
    );
    // YaRN: betas default to 32 / 1, truncation on, the attention factor from the mscales
    // (DeepSeek-V3 style) or from the factor alone (0.1 ln 4 + 1).
    let yarn = |extra: Value| {
        let mut d =
            json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64});
        d.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        load(&with(&base, "rope_scaling", d)).unwrap().rope_scaling
    };
    assert_eq!(
        yarn(json!({})),
        RopeScaling::Yarn {
            factor: 4.0,
            original_max_position_embeddings: 64,
            beta_fast: 32.0,
            beta_slow: 1.0,
            attention_factor: (0.1 * 4f64.ln() + 1.0) as f32,
            truncate: true,
        }
    );
    let RopeScaling::Yarn {
        attention_factor, ..
    } = yarn(json!({"mscale": 2.0, "mscale_all_dim": 1.0}))
    else {
        panic!("yarn")
    };
    let m = |s: f64| 0.1 * s * 4f64.ln() + 1.0;
    assert_eq!(attention_factor, (m(2.0) / m(1.0)) as f32);
    // transformers 5: rope_theta inside rope_parameters, which wins over the top-level key.
    let v5 = with(
        &base,
        "rope_parameters",
        json!({"rope_type": "default", "rope_theta": 500000.0}),
    );
    let spec = load(&v5).unwrap();
    assert_eq!(
        (spec.rope_theta, spec.rope_scaling),
        (500000.0, RopeScaling::Default)
    );
    // llama3 without original_max_position_embeddings falls back to max_position_embeddings;
    // a top-level original_max_position_embeddings (Phi-3 style) takes priority.
    let mut no_original = llama3();
    no_original
        .as_object_mut()
        .unwrap()
        .remove("original_max_position_embeddings");
    let c = with(&base, "rope_scaling", no_original);
    assert!(matches!(
        load(&c).unwrap().rope_scaling,
        RopeScaling::Llama3 {
            original_max_position_embeddings: 256,
            ..
        }
    ));
    assert!(matches!(
        load(&with(&c, "original_max_position_embeddings", json!(32)))
            .unwrap()
            .rope_scaling,
        RopeScaling::Llama3 {
            original_max_position_embeddings: 32,
            ..
        }
    ));
    let harmless = [
        ("hidden_act", json!("silu")),
        ("mlp_bias", json!(false)),
        ("rope_scaling", json!(null)),
        ("rope_scaling", json!({"rope_type": "default"})),
        ("partial_rotary_factor", json!(1.0)),
        ("attention_dropout", json!(0.1)),
        ("pretraining_tp", json!(2)),
        ("torch_dtype", json!("bfloat16")),
        ("dtype", json!("float16")),
        ("use_cache", json!(false)),
        ("pad_token_id", json!(null)),
        ("initializer_range", json!(0.02)),
        ("transformers_version", json!("5.23.0")),
        ("eos_token_id", json!([0, 1, 2])),
        ("tie_word_embeddings", json!(true)),
        ("head_dim", json!(32)),
        ("some_future_key", json!({"a": 1})),
        // Llama does not read a sliding window.
        ("sliding_window", json!(16)),
    ];
    for (key, value) in harmless {
        load(&with(&base, key, value.clone())).unwrap_or_else(|e| panic!("{key} = {value}: {e}"));
    }
    let spec = load(&with(&base, "head_dim", json!(32))).unwrap();
    assert_eq!(spec.head_dim, 32);
    // Several EOS ids: generation stops at any of them.
    assert_eq!(
        load(&with(&base, "eos_token_id", json!([1, 2])))
            .unwrap()
            .eos_token_id
            .ids(),
        &[1, 2]
    );

    // Sliding windows that cover the context, or that are off, leave the spec without one.
    let mistral = with(&base, "architectures", json!(["MistralForCausalLM"]));
    for window in [json!(null), json!(256), json!(4096)] {
        let spec = load(&with(&mistral, "sliding_window", window)).unwrap();
        assert_eq!(spec.architecture, Architecture::Mistral);
        assert_eq!(spec.sliding_window, None);
    }
    assert_eq!(
        load(&mistral).unwrap().sliding_window,
        None,
        "default window 4096 covers 256 positions"
    );
    // The window check counts layers rather than listing them: an absurd layer count is
    // refused by the limits, not by an allocation.
    let huge = with(&mistral, "num_hidden_layers", json!(1_000_000_000_000u64));
    let err = load(&huge).unwrap_err().to_string();
    assert!(err.contains("more than the limit"), "{err}");
    let qwen2 = with(&base, "architectures", json!(["Qwen2ForCausalLM"]));
    for (use_window, window, max_window_layers) in [
        (false, json!(16), json!(0)),
        (true, json!(16), json!(2)),
        (true, json!(null), json!(0)),
    ] {
        let c = with(
            &with(
                &with(&qwen2, "use_sliding_window", json!(use_window)),
                "sliding_window",
                window,
            ),
            "max_window_layers",
            max_window_layers,
        );
        let spec = load(&c).unwrap_or_else(|e| panic!("{c}: {e}"));
        assert_eq!(spec.sliding_window, None, "{c}");
    }
}

#[test]
fn sliding_windows_shorter_than_the_context_are_read_per_layer() {
    let base = llama();
    let mistral = with(&base, "architectures", json!(["MistralForCausalLM"]));
    let window = |c: &Value| {
        let w = load(c).unwrap().sliding_window.expect("a window");
        (w.size, w.layers)
    };
    assert_eq!(
        window(&with(&mistral, "sliding_window", json!(128))),
        (128, vec![0, 1])
    );
    // transformers' Mistral slides 4096 positions when the key is absent.
    assert_eq!(
        window(&with(&mistral, "max_position_embeddings", json!(8192))),
        (4096, vec![0, 1])
    );
    for arch in ["Qwen2ForCausalLM", "Qwen3ForCausalLM"] {
        let qwen = with(
            &with(&base, "architectures", json!([arch])),
            "use_sliding_window",
            json!(true),
        );
        let qwen = with(&qwen, "sliding_window", json!(64));
        let layers = |max_window_layers: u64| {
            window(&with(&qwen, "max_window_layers", json!(max_window_layers))).1
        };
        assert_eq!((layers(0), layers(1)), (vec![0, 1], vec![1]), "{arch}");
        // layer_types wins over max_window_layers.
        let typed = with(
            &with(&qwen, "max_window_layers", json!(0)),
            "layer_types",
            json!(["sliding_attention", "full_attention"]),
        );
        assert_eq!(window(&typed), (64, vec![0]), "{arch}");
        // Without use_sliding_window, no layer slides.
        let off = with(&qwen, "use_sliding_window", json!(false));
        assert_eq!(load(&off).unwrap().sliding_window, None, "{arch}");
    }
}

#[test]
fn scaled_spec_round_trips_through_config_and_unscaled_spec_json_is_unchanged() {
    let spec = load(&with(&llama(), "rope_scaling", llama3())).unwrap();
    let back = ModelSpec::try_from(HfConfig::from(&spec)).unwrap();
    assert_eq!(back, spec);
    // A spec without scaling serializes without the field (model identities and calibration
    // files from before it existed are unchanged) and reads back from such JSON.
    let plain = load(&llama()).unwrap();
    let json = serde_json::to_value(&plain).unwrap();
    assert!(json.get("rope_scaling").is_none(), "{json}");
    assert_eq!(serde_json::from_value::<ModelSpec>(json).unwrap(), plain);
    let json = serde_json::to_value(&spec).unwrap();
    assert_eq!(json["rope_scaling"]["rope_type"], "llama3");
    assert_eq!(serde_json::from_value::<ModelSpec>(json).unwrap(), spec);
}
