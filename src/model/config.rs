//! Hugging Face `config.json`: a raw serde struct that mirrors the file field for field
//! ([`HfConfig`]), then a `TryFrom` into the validated [`ModelSpec`].
//!
//! Parsing and validation are separate steps: serde only checks types, and every rule about
//! the numbers (positive sizes, heads that divide, a supported architecture) lives in
//! [`validate_spec`], which the GGUF reader shares. Defaults follow `transformers`
//! (`num_key_value_heads` = heads, `head_dim` = hidden / heads, `rope_theta` = 10000).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{config_keys, Architecture, EosIds, ModelSpec};
use crate::error::{Error, Result};

/// The `architectures` entries fpx accepts, as a message for errors.
pub const SUPPORTED_HF: &str = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, \
     Qwen3ForCausalLM, Qwen3MoeForCausalLM, MixtralForCausalLM";

/// `eos_token_id` is an integer in most configs and a list in some (Llama 3).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    /// The ids, in the order listed.
    pub fn ids(&self) -> &[u32] {
        match self {
            TokenIds::One(id) => std::slice::from_ref(id),
            TokenIds::Many(ids) => ids.as_slice(),
        }
    }

    /// The first id.
    pub fn first(&self) -> Option<u32> {
        self.ids().first().copied()
    }

    /// The key as config.json writes it: `None` without ids, one id, or a list.
    pub fn of(ids: &EosIds) -> Option<TokenIds> {
        match ids.ids() {
            [] => None,
            [id] => Some(TokenIds::One(*id)),
            many => Some(TokenIds::Many(many.to_vec())),
        }
    }
}

/// `config.json` as Hugging Face writes it: the fields fpx reads, and the rest in `other`
/// (see [`config_keys`] for what happens to each key).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct HfConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub model_type: Option<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rms_norm_eps: Option<f64>,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub bos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_act: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_bias: Option<bool>,
    /// RoPE scaling as transformers 4 writes it (a dict, or null).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<Value>,
    /// RoPE base and scaling as transformers 5 writes them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
    /// `None`: the key is absent (Mistral then defaults to 4096); `Some(None)`: null.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub sliding_window: Option<Option<u64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_sliding_window: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_window_layers: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
    /// Every other key: listed as harmless in [`config_keys::IGNORED_KEYS`] or warned about.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// A key that is present deserializes to `Some`, even when its value is null.
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// Why a config could not become a [`ModelSpec`]; the caller adds the path.
#[derive(Debug, Clone, PartialEq)]
pub enum ConfigError {
    UnsupportedArchitecture(String),
    Invalid(String),
}

impl ConfigError {
    /// Attach the file the config came from.
    pub fn at(self, path: &Path) -> Error {
        match self {
            ConfigError::UnsupportedArchitecture(arch) => Error::UnsupportedArchitecture {
                path: path.to_path_buf(),
                arch,
                supported: SUPPORTED_HF,
            },
            ConfigError::Invalid(reason) => Error::Config {
                path: path.to_path_buf(),
                reason,
            },
        }
    }
}

impl HfConfig {
    /// Read and parse `config.json` (no validation beyond types).
    pub fn read(path: &Path) -> Result<Self> {
        Self::parse(&crate::fsutil::read_regular(path)?, path)
    }

    /// Parse the bytes of a `config.json` (`path` names them in errors).
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self> {
        serde_json::from_slice(bytes).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }

    fn architecture(&self) -> Result<Architecture, ConfigError> {
        let name = match (self.architectures.first(), &self.model_type) {
            (Some(a), _) => a.as_str(),
            (None, Some(t)) => t.as_str(),
            (None, None) => {
                return Err(ConfigError::Invalid(
                    "neither `architectures` nor `model_type` is set".into(),
                ))
            }
        };
        match name {
            "LlamaForCausalLM" | "llama" => Ok(Architecture::Llama),
            "MistralForCausalLM" | "mistral" => Ok(Architecture::Mistral),
            "Qwen2ForCausalLM" | "qwen2" => Ok(Architecture::Qwen2),
            "Qwen3ForCausalLM" | "qwen3" => Ok(Architecture::Qwen3),
            "Qwen3MoeForCausalLM" | "qwen3_moe" => Ok(Architecture::Qwen3Moe),
            "MixtralForCausalLM" | "mixtral" => Ok(Architecture::Mixtral),
            other => Err(ConfigError::UnsupportedArchitecture(other.to_string())),
        }
    }
}

/// The `architectures` entry Hugging Face uses for an [`Architecture`].
pub fn hf_architecture_name(arch: Architecture) -> &'static str {
    match arch {
        Architecture::Llama => "LlamaForCausalLM",
        Architecture::Mistral => "MistralForCausalLM",
        Architecture::Qwen2 => "Qwen2ForCausalLM",
        Architecture::Qwen3 => "Qwen3ForCausalLM",
        Architecture::Qwen3Moe => "Qwen3MoeForCausalLM",
        Architecture::Mixtral => "MixtralForCausalLM",
    }
}

/// The `model_type` Hugging Face uses for an [`Architecture`].
pub fn hf_model_type(arch: Architecture) -> &'static str {
    match arch {
        Architecture::Llama => "llama",
        Architecture::Mistral => "mistral",
        Architecture::Qwen2 => "qwen2",
        Architecture::Qwen3 => "qwen3",
        Architecture::Qwen3Moe => "qwen3_moe",
        Architecture::Mixtral => "mixtral",
    }
}

impl TryFrom<HfConfig> for ModelSpec {
    type Error = ConfigError;

    fn try_from(mut c: HfConfig) -> Result<Self, ConfigError> {
        let architecture = c.architecture()?;
        let moe = super::moe::from_config(
            architecture,
            &mut c.other,
            c.intermediate_size,
            c.num_hidden_layers,
        )?;
        // Named as the config names them (validate_spec, shared with GGUF, uses spec names).
        for (key, v) in [
            ("hidden_size", Some(c.hidden_size)),
            ("intermediate_size", Some(c.intermediate_size)),
            ("num_hidden_layers", Some(c.num_hidden_layers)),
            ("num_attention_heads", Some(c.num_attention_heads)),
            ("num_key_value_heads", c.num_key_value_heads),
            ("head_dim", c.head_dim),
            ("vocab_size", Some(c.vocab_size)),
            ("max_position_embeddings", c.max_position_embeddings),
        ] {
            if v == Some(0) {
                return Err(ConfigError::Invalid(format!("{key} = 0: must be > 0")));
            }
        }
        for (key, ids) in [
            ("bos_token_id", &c.bos_token_id),
            ("eos_token_id", &c.eos_token_id),
        ] {
            let ids = ids.as_ref().map_or(&[][..], TokenIds::ids);
            if let Some(id) = ids.iter().find(|&&id| id as usize >= c.vocab_size) {
                return Err(ConfigError::Invalid(format!(
                    "{key} {id} is outside the vocabulary ({})",
                    c.vocab_size
                )));
            }
        }
        config_keys::check_mlp(&c)?;
        let head_dim = match c.head_dim {
            Some(d) => d,
            // transformers' Qwen3Config defaults head_dim to 128, not hidden / heads.
            None if architecture == Architecture::Qwen3 => 128,
            None => {
                if !c.hidden_size.is_multiple_of(c.num_attention_heads) {
                    return Err(ConfigError::Invalid(format!(
                        "hidden_size {} is not divisible by num_attention_heads {}",
                        c.hidden_size, c.num_attention_heads
                    )));
                }
                c.hidden_size / c.num_attention_heads
            }
        };
        let default_ctx = match architecture {
            Architecture::Llama => 2048,
            Architecture::Mixtral => 131072,
            Architecture::Mistral | Architecture::Qwen2 | Architecture::Qwen3 => 32768,
            Architecture::Qwen3Moe => 32768,
        };
        let max_position_embeddings = c.max_position_embeddings.unwrap_or(default_ctx);
        let (rope_theta, rope_scaling) = config_keys::rope(&c, max_position_embeddings)?;
        let sliding_window =
            config_keys::sliding_window(&c, architecture, max_position_embeddings)?;
        config_keys::warn_unknown(&c.other);
        let spec = ModelSpec {
            architecture,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_layers: c.num_hidden_layers,
            num_heads: c.num_attention_heads,
            num_kv_heads: c.num_key_value_heads.unwrap_or(c.num_attention_heads),
            head_dim,
            vocab_size: c.vocab_size,
            rope_theta,
            rope_scaling,
            rms_norm_eps: c.rms_norm_eps.unwrap_or(1e-6) as f32,
            tie_word_embeddings: c.tie_word_embeddings.unwrap_or(false),
            // Qwen2 always has q/k/v biases and its config has no field for them; Mistral's
            // attention has none whatever the config says (transformers does not read it).
            attention_bias: match architecture {
                Architecture::Qwen2 => true,
                Architecture::Mistral | Architecture::Mixtral => false,
                Architecture::Llama | Architecture::Qwen3 | Architecture::Qwen3Moe => {
                    c.attention_bias.unwrap_or(false)
                }
            },
            max_position_embeddings,
            sliding_window,
            bos_token_id: c.bos_token_id.as_ref().and_then(TokenIds::first),
            eos_token_id: EosIds::new(c.eos_token_id.iter().flat_map(|t| t.ids().to_vec())),
            moe,
        };
        validate_spec(&spec).map_err(ConfigError::Invalid)?;
        Ok(spec)
    }
}

impl From<&ModelSpec> for HfConfig {
    /// The config a Hugging Face checkpoint of this spec would carry.
    fn from(s: &ModelSpec) -> Self {
        HfConfig {
            architectures: vec![hf_architecture_name(s.architecture).to_string()],
            model_type: Some(hf_model_type(s.architecture).to_string()),
            hidden_size: s.hidden_size,
            intermediate_size: s.intermediate_size,
            num_hidden_layers: s.num_layers,
            num_attention_heads: s.num_heads,
            num_key_value_heads: Some(s.num_kv_heads),
            head_dim: Some(s.head_dim),
            vocab_size: s.vocab_size,
            rope_theta: Some(s.rope_theta as f64),
            rms_norm_eps: Some(s.rms_norm_eps as f64),
            tie_word_embeddings: Some(s.tie_word_embeddings),
            max_position_embeddings: Some(s.max_position_embeddings),
            bos_token_id: s.bos_token_id.map(TokenIds::One),
            eos_token_id: TokenIds::of(&s.eos_token_id),
            attention_bias: Some(s.attention_bias),
            hidden_act: None,
            mlp_bias: None,
            rope_scaling: (!s.rope_scaling.is_default())
                .then(|| serde_json::to_value(&s.rope_scaling).expect("rope scaling serializes")),
            rope_parameters: None,
            partial_rotary_factor: None,
            original_max_position_embeddings: None,
            sliding_window: match (s.architecture, &s.sliding_window) {
                (_, Some(w)) => Some(Some(w.size as u64)),
                // Without the key transformers' Mistral slides 4096 positions.
                (Architecture::Mistral, None) => Some(None),
                _ => None,
            },
            use_sliding_window: (s.sliding_window.is_some()
                && !matches!(
                    s.architecture,
                    Architecture::Mistral | Architecture::Mixtral
                ))
            .then_some(true),
            max_window_layers: None,
            layer_types: match (s.architecture, &s.sliding_window) {
                (Architecture::Qwen2 | Architecture::Qwen3, Some(w)) => Some(
                    (0..s.num_layers)
                        .map(|l| {
                            let kind = if w.of_layer(l).is_some() {
                                "sliding"
                            } else {
                                "full"
                            };
                            format!("{kind}_attention")
                        })
                        .collect(),
                ),
                _ => None,
            },
            other: s
                .moe
                .as_ref()
                .map(|m| super::moe::to_config(s.architecture, m))
                .unwrap_or_default(),
        }
    }
}

/// Read `config.json` and validate it into a [`ModelSpec`].
pub fn load_config(path: &Path) -> Result<ModelSpec> {
    let raw = HfConfig::read(path)?;
    ModelSpec::try_from(raw).map_err(|e| e.at(path))
}

/// Rules every [`ModelSpec`] obeys, whatever file it came from.
pub fn validate_spec(s: &ModelSpec) -> Result<(), String> {
    let positive = [
        ("hidden_size", s.hidden_size),
        ("intermediate_size", s.intermediate_size),
        ("num_layers", s.num_layers),
        ("num_heads", s.num_heads),
        ("num_kv_heads", s.num_kv_heads),
        ("head_dim", s.head_dim),
        ("vocab_size", s.vocab_size),
        ("max_position_embeddings", s.max_position_embeddings),
    ];
    for (name, v) in positive {
        if v == 0 {
            return Err(format!("{name} must be > 0"));
        }
    }
    crate::limits::at_most(s.num_layers, crate::limits::MAX_LAYERS, "num_layers")?;
    // Every weight's element count must be computable: q/kv widths, then each matrix.
    let q = crate::limits::mul(s.num_heads, s.head_dim, "num_heads x head_dim")?;
    let kv = crate::limits::mul(s.num_kv_heads, s.head_dim, "num_kv_heads x head_dim")?;
    for (name, rows, cols) in [
        (
            "embedding (vocab_size x hidden_size)",
            s.vocab_size,
            s.hidden_size,
        ),
        ("q_proj", q, s.hidden_size),
        ("k_proj", kv, s.hidden_size),
        ("gate_proj", s.intermediate_size, s.hidden_size),
    ] {
        crate::limits::tensor_elements(&[rows, cols]).map_err(|e| format!("{name}: {e}"))?;
    }
    if !s.num_heads.is_multiple_of(s.num_kv_heads) {
        return Err(format!(
            "num_attention_heads {} is not a multiple of num_key_value_heads {}",
            s.num_heads, s.num_kv_heads
        ));
    }
    if !s.head_dim.is_multiple_of(2) {
        return Err(format!("head_dim {} must be even for RoPE", s.head_dim));
    }
    if !(s.rope_theta.is_finite() && s.rope_theta > 0.0) {
        return Err(format!("rope_theta {} must be positive", s.rope_theta));
    }
    if !(s.rms_norm_eps.is_finite() && s.rms_norm_eps > 0.0) {
        return Err(format!("rms_norm_eps {} must be positive", s.rms_norm_eps));
    }
    let ids = s.bos_token_id.iter().map(|&id| ("bos_token_id", id));
    for (name, id) in ids.chain(s.eos_token_id.ids().iter().map(|&id| ("eos_token_id", id))) {
        if id as usize >= s.vocab_size {
            return Err(format!(
                "{name} {id} is outside the vocabulary ({})",
                s.vocab_size
            ));
        }
    }
    if let Some(w) = &s.sliding_window {
        if s.architecture == Architecture::Llama {
            return Err("Llama has no sliding-window attention".into());
        }
        let every_layer = matches!(
            s.architecture,
            Architecture::Mistral | Architecture::Mixtral | Architecture::Qwen3Moe
        );
        if every_layer && w.layers.len() != s.num_layers {
            return Err(format!(
                "{:?} slides every layer's attention or none",
                s.architecture
            ));
        }
        w.validate(s.num_layers)?;
    }
    match (&s.moe, crate::model::moe::MoeNames::of(s.architecture)) {
        (Some(m), Some(_)) => m.validate(s.num_layers)?,
        (None, None) => {}
        (Some(_), None) => return Err(format!("{:?} has no experts", s.architecture)),
        (None, Some(_)) => return Err(format!("{:?} needs its experts", s.architecture)),
    }
    if let crate::model::rope::RopeScaling::Factors { factors } = &s.rope_scaling {
        if factors.len() != s.head_dim / 2 {
            return Err(format!(
                "{} RoPE frequency factors for head_dim {} (need head_dim / 2)",
                factors.len(),
                s.head_dim
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm_like() -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "vocab_size": 49152,
            "rope_theta": 100000.0,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": true,
            "max_position_embeddings": 8192,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "bfloat16"
        })
    }

    fn parse(v: serde_json::Value) -> Result<ModelSpec, ConfigError> {
        let raw: HfConfig = serde_json::from_value(v).unwrap();
        ModelSpec::try_from(raw)
    }

    #[test]
    fn parses_llama_config_with_defaults() {
        let s = parse(smollm_like()).unwrap();
        assert_eq!(s.architecture, Architecture::Llama);
        assert_eq!(s.head_dim, 64);
        assert_eq!(s.num_kv_heads, 3);
        assert!(s.tie_word_embeddings);
        assert!(!s.attention_bias);
        assert_eq!(s.eos_token_id.ids(), &[2]);
        let mut v = smollm_like();
        v.as_object_mut().unwrap().remove("num_key_value_heads");
        v.as_object_mut().unwrap().remove("rope_theta");
        let s = parse(v).unwrap();
        assert_eq!(s.num_kv_heads, 9);
        assert_eq!(s.rope_theta, 10_000.0);
    }

    #[test]
    fn eos_list_is_kept_and_qwen2_has_bias() {
        let mut v = smollm_like();
        v["architectures"] = serde_json::json!(["Qwen2ForCausalLM"]);
        v["eos_token_id"] = serde_json::json!([2, 0]);
        let s = parse(v).unwrap();
        assert_eq!(s.architecture, Architecture::Qwen2);
        assert!(s.attention_bias);
        assert_eq!(s.eos_token_id.ids(), &[2, 0]);
        let back = ModelSpec::try_from(HfConfig::from(&s)).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn qwen3_defaults_head_dim_to_128_and_has_qk_norm() {
        let mut v = smollm_like();
        v["architectures"] = serde_json::json!(["Qwen3ForCausalLM"]);
        let s = parse(v).unwrap();
        assert_eq!(s.architecture, Architecture::Qwen3);
        assert_eq!(s.head_dim, 128);
        assert!(s.qk_norm() && !s.attention_bias && !s.o_proj_bias());
        let names: Vec<String> = crate::model::expected_tensors(&s)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert!(names.contains(&"model.layers.0.self_attn.k_norm.weight".to_string()));
    }

    #[test]
    fn windows_round_trip_through_config() {
        let mut v = smollm_like();
        v["architectures"] = serde_json::json!(["Qwen3ForCausalLM"]);
        v["num_hidden_layers"] = serde_json::json!(4);
        v["use_sliding_window"] = serde_json::json!(true);
        v["sliding_window"] = serde_json::json!(64);
        v["max_window_layers"] = serde_json::json!(1);
        let s = parse(v).unwrap();
        let w = s.sliding_window.clone().unwrap();
        assert_eq!((w.size, w.layers.as_slice()), (64, &[1, 2, 3][..]));
        assert_eq!(ModelSpec::try_from(HfConfig::from(&s)).unwrap(), s);
        let mut v = smollm_like();
        v["architectures"] = serde_json::json!(["MistralForCausalLM"]);
        v["sliding_window"] = serde_json::json!(100);
        let s = parse(v).unwrap();
        assert_eq!(s.sliding_window.as_ref().unwrap().layers.len(), 30);
        assert_eq!(ModelSpec::try_from(HfConfig::from(&s)).unwrap(), s);
    }

    #[test]
    fn rejects_bad_numbers_and_architectures() {
        let mut v = smollm_like();
        v["num_key_value_heads"] = serde_json::json!(4);
        assert!(matches!(parse(v), Err(ConfigError::Invalid(r)) if r.contains("multiple")));
        let mut v = smollm_like();
        v["num_attention_heads"] = serde_json::json!(7);
        v["num_key_value_heads"] = serde_json::json!(7);
        assert!(matches!(parse(v), Err(ConfigError::Invalid(r)) if r.contains("divisible")));
        let mut v = smollm_like();
        v["intermediate_size"] = serde_json::json!(0);
        assert!(matches!(parse(v), Err(ConfigError::Invalid(_))));
        let mut v = smollm_like();
        v["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
        assert_eq!(
            parse(v),
            Err(ConfigError::UnsupportedArchitecture(
                "GPT2LMHeadModel".into()
            ))
        );
    }

    #[test]
    fn spec_round_trips_through_config() {
        let s = parse(smollm_like()).unwrap();
        let back = ModelSpec::try_from(HfConfig::from(&s)).unwrap();
        assert_eq!(s, back);
    }
}
