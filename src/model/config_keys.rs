//! Which `config.json` keys change the computation, and what fpx does with each: implement it,
//! refuse the value naming key and value, or (for keys that change nothing fpx computes) list
//! it in [`IGNORED_KEYS`]. Anything else is unknown: reported by `tracing::warn!` (transformers'
//! Llama, Mistral, Qwen2 and Qwen3 classes do not read keys outside their config class either, so an
//! unknown key is metadata to them too), never silently dropped.
//!
//! What the model classes of transformers 5 read, and where fpx handles it:
//! - sizes, heads, `head_dim`, `vocab_size`, `rms_norm_eps`, `tie_word_embeddings`,
//!   `attention_bias`, `max_position_embeddings`, token ids: `config.rs`;
//! - `hidden_act` (silu only), `mlp_bias` (false only): [`check_mlp`];
//! - `rope_theta`, `rope_scaling` (transformers 4) / `rope_parameters` (transformers 5),
//!   `partial_rotary_factor`, `original_max_position_embeddings`: [`rope`];
//! - `sliding_window`, `use_sliding_window`, `max_window_layers`, `layer_types`:
//!   [`sliding_window`] (windowed attention on every backend).

use serde_json::{Map, Value};

use super::config::{ConfigError, HfConfig};
use super::rope::RopeScaling;
use super::{Architecture, SlidingWindow};

/// Keys that do not change the logits fpx computes, with the reason. `config.rs` reads the keys
/// of [`HfConfig`]'s own fields; every other key must be in this table or it is warned about.
pub const IGNORED_KEYS: &[(&str, &str)] = &[
    ("_name_or_path", "provenance"),
    ("transformers_version", "provenance"),
    (
        "torch_dtype",
        "storage type; fpx computes in FP32 from the stored weights",
    ),
    ("dtype", "storage type (transformers 5 name of torch_dtype)"),
    (
        "quantization_config",
        "read by model::compressed (compressed-tensors weights)",
    ),
    ("initializer_range", "training initialisation"),
    ("use_cache", "a runtime option of transformers' generate"),
    (
        "pad_token_id",
        "padding index of the embedding (training only)",
    ),
    ("attention_dropout", "dropout is off at inference"),
    (
        "pretraining_tp",
        "tensor-parallel slicing of the product; the same product",
    ),
    (
        "tokenizer_class",
        "tokenizer metadata; fpx reads tokenizer.json",
    ),
    (
        "auto_map",
        "custom-code entry points; the architecture is checked by name",
    ),
    ("id2label", "classification heads"),
    ("label2id", "classification heads"),
    ("return_dict", "output structure of transformers"),
    ("output_attentions", "output structure of transformers"),
    ("output_hidden_states", "output structure of transformers"),
    ("torchscript", "export option of transformers"),
    ("is_decoder", "always a decoder here"),
    ("is_encoder_decoder", "always decoder-only here"),
    (
        "max_length",
        "generation default (fpx takes lengths as arguments)",
    ),
    ("do_sample", "generation default (fpx decodes greedily)"),
    ("temperature", "generation default (fpx decodes greedily)"),
    ("top_k", "generation default (fpx decodes greedily)"),
    (
        "router_aux_loss_coef",
        "MoE load-balancing loss (training only)",
    ),
    (
        "output_router_logits",
        "MoE router logits as an output (training only)",
    ),
    (
        "router_jitter_noise",
        "Mixtral's router noise, applied in training only",
    ),
    ("top_p", "generation default (fpx decodes greedily)"),
    ("num_beams", "generation default (fpx decodes greedily)"),
    (
        "repetition_penalty",
        "generation default (fpx decodes greedily)",
    ),
];

/// `tracing::warn!` of the keys that are neither read nor listed in [`IGNORED_KEYS`].
pub fn warn_unknown(other: &std::collections::BTreeMap<String, Value>) {
    let unknown: Vec<&str> = other
        .keys()
        .map(String::as_str)
        .filter(|k| !IGNORED_KEYS.iter().any(|(name, _)| name == k))
        .collect();
    if !unknown.is_empty() {
        tracing::warn!(
            "config.json: keys fpx does not know, ignored (the Llama, Mistral, Qwen2 and Qwen3 \
             classes of transformers do not read them either): {}",
            unknown.join(", ")
        );
    }
}

fn unsupported(key: &str, value: &Value, what: &str) -> ConfigError {
    ConfigError::Invalid(format!("{key} = {value} is not supported ({what})"))
}

/// `hidden_act` must be SiLU (fpx's gate is SiLU) and the MLP must have no biases.
pub fn check_mlp(c: &HfConfig) -> Result<(), ConfigError> {
    if let Some(act) = &c.hidden_act {
        if act != "silu" && act != "swish" {
            return Err(unsupported(
                "hidden_act",
                &Value::from(act.as_str()),
                "fpx implements silu",
            ));
        }
    }
    if c.mlp_bias == Some(true) {
        return Err(unsupported(
            "mlp_bias",
            &Value::Bool(true),
            "gate/up/down projections without biases only",
        ));
    }
    Ok(())
}

/// Base and scaling of RoPE, resolved as transformers' `convert_rope_params_to_dict` and
/// `standardize_rope_params` do: `rope_scaling` if set, else `rope_parameters`; the type from
/// `rope_type`, else `type`, else "default"; `rope_theta` from the dict, else the top-level key,
/// else 10000; llama3's `original_max_position_embeddings` from the top-level key, else the
/// dict, else `max_position_embeddings` (yarn likewise). `dynamic` is the default RoPE within
/// the model's context (the only positions fpx runs). Other types are refused by name, as is a
/// partial rotary dimension.
pub fn rope(c: &HfConfig, max_positions: usize) -> Result<(f32, RopeScaling), ConfigError> {
    let (name, dict) = match (&c.rope_scaling, &c.rope_parameters) {
        (Some(v), _) if !is_empty(v) => ("rope_scaling", v),
        (_, Some(v)) if !is_empty(v) => ("rope_parameters", v),
        _ => ("rope_scaling", &Value::Null),
    };
    let empty = Map::new();
    let dict = match dict {
        Value::Null => &empty,
        Value::Object(m) => flat(name, m)?,
        other => {
            return Err(ConfigError::Invalid(format!(
                "{name} = {other} is not an object"
            )))
        }
    };
    let key = |k: &str| format!("{name}.{k}");
    let number = |k: &str| -> Result<Option<f64>, ConfigError> {
        match dict.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| ConfigError::Invalid(format!("{} = {v} is not a number", key(k)))),
        }
    };
    let required = |k: &str, ty: &str| -> Result<f32, ConfigError> {
        number(k)?.map(|v| v as f32).ok_or_else(|| {
            ConfigError::Invalid(format!("{} is required for rope_type \"{ty}\"", key(k)))
        })
    };
    let theta = number("rope_theta")?.or(c.rope_theta).unwrap_or(10_000.0) as f32;
    if let Some(p) = number("partial_rotary_factor")?.or(c.partial_rotary_factor) {
        if p != 1.0 {
            return Err(unsupported(
                "partial_rotary_factor",
                &Value::from(p),
                "fpx rotates the whole head",
            ));
        }
    }
    // llama3 and yarn: the top-level key, else the dict's, else the model's context
    // (`standardize_rope_params`).
    let original = || -> Result<usize, ConfigError> {
        match (c.original_max_position_embeddings, number(ORIGINAL)?) {
            (Some(n), _) => Ok(n),
            (None, Some(n)) if n > 0.0 && n.fract() == 0.0 => Ok(n as usize),
            (None, Some(n)) => Err(ConfigError::Invalid(format!(
                "{} = {n} is not a positive integer",
                key(ORIGINAL)
            ))),
            (None, None) => Ok(max_positions),
        }
    };
    // transformers 4 configs may spell it `type`.
    let type_key = if dict.contains_key("rope_type") {
        "rope_type"
    } else {
        "type"
    };
    let rope_type = match dict.get(type_key) {
        None | Some(Value::Null) => "default",
        Some(Value::String(s)) => s.as_str(),
        Some(v) => {
            return Err(ConfigError::Invalid(format!(
                "{} = {v} is not a string",
                key(type_key)
            )))
        }
    };
    let (scaling, read): (RopeScaling, &[&str]) = match rope_type {
        "default" => (RopeScaling::Default, &[]),
        "linear" => (
            RopeScaling::Linear {
                factor: required("factor", rope_type)?,
            },
            &["factor"],
        ),
        "llama3" => (
            RopeScaling::Llama3 {
                factor: required("factor", rope_type)?,
                low_freq_factor: required("low_freq_factor", rope_type)?,
                high_freq_factor: required("high_freq_factor", rope_type)?,
                original_max_position_embeddings: original()?,
            },
            &["factor", "low_freq_factor", "high_freq_factor", ORIGINAL],
        ),
        // Dynamic NTK scaling raises the base only for sequences longer than
        // `max_position_embeddings` (transformers' `dynamic_rope_update`), and fpx refuses
        // those: within the context it is the default RoPE, bit for bit.
        "dynamic" => {
            let factor = required("factor", rope_type)?;
            RopeScaling::Linear { factor }
                .validate()
                .map_err(ConfigError::Invalid)?;
            (RopeScaling::Default, &["factor"])
        }
        "yarn" => {
            let original = original()?;
            // `_compute_yarn_parameters`: a missing factor is the context ratio (DeepSeek-V3);
            // betas of 0 take the defaults (`or 32`, `or 1`); the attention factor from the
            // mscales in f64, as Python computes it.
            let factor = number("factor")?.unwrap_or(max_positions as f64 / original as f64);
            let mscale = |m: f64| {
                if factor <= 1.0 {
                    1.0
                } else {
                    0.1 * m * factor.ln() + 1.0
                }
            };
            let attention_factor = match (
                number("attention_factor")?,
                number("mscale")?,
                number("mscale_all_dim")?,
            ) {
                (Some(a), _, _) => a,
                (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => mscale(m) / mscale(all),
                _ => mscale(1.0),
            };
            let truncate = match dict.get("truncate") {
                None | Some(Value::Null) => true,
                Some(Value::Bool(b)) => *b,
                Some(v) => {
                    return Err(ConfigError::Invalid(format!(
                        "{} = {v} is not a boolean",
                        key("truncate")
                    )))
                }
            };
            let beta = |k: &str, default: f64| -> Result<f32, ConfigError> {
                Ok(number(k)?.filter(|&b| b != 0.0).unwrap_or(default) as f32)
            };
            (
                RopeScaling::Yarn {
                    factor: factor as f32,
                    original_max_position_embeddings: original,
                    beta_fast: beta("beta_fast", 32.0)?,
                    beta_slow: beta("beta_slow", 1.0)?,
                    attention_factor: attention_factor as f32,
                    truncate,
                },
                &[
                    "factor",
                    ORIGINAL,
                    "beta_fast",
                    "beta_slow",
                    "attention_factor",
                    "mscale",
                    "mscale_all_dim",
                    "truncate",
                ],
            )
        }
        other => {
            return Err(unsupported(
                &key(type_key),
                &Value::from(other),
                "fpx implements default, linear, llama3, yarn and dynamic",
            ))
        }
    };
    scaling
        .validate()
        .map_err(|e| ConfigError::Invalid(e.replacen("rope_scaling.", &format!("{name}."), 1)))?;
    let common = ["rope_type", "type", "rope_theta", "partial_rotary_factor"];
    let unread: Vec<&str> = dict
        .keys()
        .map(String::as_str)
        .filter(|k| !common.contains(k) && !read.contains(k))
        .collect();
    if !unread.is_empty() {
        tracing::warn!(
            "config.json: {name} keys that rope_type \"{rope_type}\" does not read \
             (transformers ignores them too): {}",
            unread.join(", ")
        );
    }
    Ok((theta, scaling))
}

const ORIGINAL: &str = "original_max_position_embeddings";

fn is_empty(v: &Value) -> bool {
    v.is_null() || v.as_object().is_some_and(Map::is_empty)
}

/// transformers 5 may nest `rope_parameters` by layer type (`{"full_attention": {...}}`): one
/// dict for every layer is accepted as that dict, different ones are refused.
fn flat<'a>(name: &str, m: &'a Map<String, Value>) -> Result<&'a Map<String, Value>, ConfigError> {
    let nested: Vec<&Map<String, Value>> = m.values().filter_map(Value::as_object).collect();
    if nested.is_empty() {
        return Ok(m);
    }
    if nested.len() == m.len() && nested.iter().all(|n| *n == nested[0]) {
        return Ok(nested[0]);
    }
    Err(ConfigError::Invalid(format!(
        "{name} = {} is not supported (one RoPE for every layer only)",
        Value::Object(m.clone())
    )))
}

/// The sliding window of the layers that use one, as transformers reads the keys: Mistral
/// slides every layer with `sliding_window` (4096 when the key is absent); Qwen2 and Qwen3
/// only with `use_sliding_window`, on the layers `layer_types` marks `sliding_attention`
/// (else those from `max_window_layers` on, default 28); Llama ignores the keys. A window of
/// at least `max_positions` never drops a key and is left out (`None`), as is a null one.
pub fn sliding_window(
    c: &HfConfig,
    arch: Architecture,
    max_positions: usize,
) -> Result<Option<SlidingWindow>, ConfigError> {
    const DEFAULT_WINDOW: u64 = 4096;
    if let Some(types) = &c.layer_types {
        if let Some(bad) = types
            .iter()
            .find(|t| *t != "full_attention" && *t != "sliding_attention")
        {
            return Err(unsupported(
                "layer_types",
                &Value::from(bad.as_str()),
                "full_attention and sliding_attention only",
            ));
        }
    }
    let window = match arch {
        Architecture::Llama => None,
        Architecture::Mistral => c.sliding_window.unwrap_or(Some(DEFAULT_WINDOW)),
        // MixtralConfig's sliding_window defaults to null.
        Architecture::Mixtral => c.sliding_window.flatten(),
        Architecture::Qwen2 | Architecture::Qwen3 | Architecture::Qwen3Moe
            if c.use_sliding_window == Some(true) =>
        {
            c.sliding_window.unwrap_or(Some(DEFAULT_WINDOW))
        }
        Architecture::Qwen2 | Architecture::Qwen3 | Architecture::Qwen3Moe => None,
    };
    let size = match window {
        Some(w) if w < max_positions as u64 => w as usize,
        _ => return Ok(None),
    };
    if size == 0 {
        return Err(unsupported(
            "sliding_window",
            &Value::from(0),
            "a window holds at least one position",
        ));
    }
    // Listed only once the layer count is known to be sane (validate_spec checks it again).
    let n = c.num_hidden_layers;
    crate::limits::at_most(n, crate::limits::MAX_LAYERS, "num_hidden_layers")
        .map_err(ConfigError::Invalid)?;
    let layers: Vec<usize> = match (arch, &c.layer_types) {
        // Their attention classes window every layer (Qwen3-MoE reads no layer_types).
        (Architecture::Mistral | Architecture::Mixtral | Architecture::Qwen3Moe, _) => {
            (0..n).collect()
        }
        (_, Some(t)) => (0..n)
            .filter(|&l| t.get(l).is_some_and(|t| t == "sliding_attention"))
            .collect(),
        (_, None) => (c.max_window_layers.unwrap_or(28).min(n)..n).collect(),
    };
    Ok((!layers.is_empty()).then_some(SlidingWindow { size, layers }))
}
