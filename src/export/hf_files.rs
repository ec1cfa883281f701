//! The non-tensor files of an exported Hugging Face directory: `config.json` (the model's own
//! config plus `quantization_config`), `generation_config.json`, the tokenizer files, and
//! `model.safetensors.index.json`.
//!
//! From a Hugging Face directory the original `config.json` is kept field for field and the
//! tokenizer and generation files are copied; from a GGUF, `config.json` is written from the
//! validated spec and the tokenizer from the GGUF metadata (`tokenizer.json` +
//! `tokenizer_config.json`).

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

use super::ExportDtype;
use crate::error::{Error, Result};
use crate::model::config::HfConfig;
use crate::model::{Model, SourceKind};

/// Files copied as they are from a Hugging Face source directory, when present.
const COPIED: [&str; 6] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
];

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::File {
        path: path.to_path_buf(),
        what: "json",
        reason: e.to_string(),
    })
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(v).expect("json serializes");
    text.push('\n');
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// `config.json`: the model's config with `quantization_config`, the export dtype, and
/// `tie_word_embeddings` as written (false when lm_head is exported on its own).
pub fn write_config(
    model: &Model,
    dir: &Path,
    dtype: ExportDtype,
    tied: bool,
    quantization: Value,
) -> Result<()> {
    let mut config = match model.kind {
        SourceKind::HuggingFace => {
            let mut c = read_json(&model.path.join("config.json"))?;
            // A compressed-tensors source is re-exported from its decoded weights.
            if let Some(o) = c.as_object_mut() {
                o.remove("quantization_config");
            }
            c
        }
        SourceKind::Gguf => {
            // llama.cpp's factors do not say which llama3 parameters made them, and
            // transformers reads RoPE scaling only as parameters.
            if let crate::model::rope::RopeScaling::Factors { .. } = model.spec.rope_scaling {
                return Err(Error::File {
                    path: model.path.clone(),
                    what: "model",
                    reason: format!(
                        "its RoPE scaling is a {} tensor of frequency factors, which a \
                         transformers config.json cannot state; export the Hugging Face \
                         checkpoint instead",
                        crate::model::gguf::ROPE_FREQS
                    ),
                });
            }
            let mut c = serde_json::to_value(HfConfig::from(&model.spec)).expect("serializes");
            c["hidden_act"] = "silu".into();
            if model.spec.architecture == crate::model::Architecture::Qwen2 {
                c.as_object_mut().expect("object").remove("attention_bias");
            }
            c
        }
    };
    config["torch_dtype"] = dtype.torch_name().into();
    config["tie_word_embeddings"] = tied.into();
    if !quantization.is_null() {
        config["quantization_config"] = quantization;
    }
    write_json(&dir.join("config.json"), &config)
}

/// Tokenizer and generation files.
pub fn write_tokenizer_and_generation(model: &Model, dir: &Path) -> Result<()> {
    let spec = &model.spec;
    if model.kind == SourceKind::HuggingFace {
        for name in COPIED {
            let src = model.path.join(name);
            if src.is_file() {
                let dst = dir.join(name);
                std::fs::copy(&src, &dst).map_err(|e| Error::io(&dst, e))?;
            }
        }
    } else {
        let path = dir.join("tokenizer.json");
        let text = model
            .tokenizer
            .inner()
            .to_string(true)
            .map_err(|e| Error::Tokenizer {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
        let token = |id: Option<u32>| {
            id.and_then(|i| model.tokenizer.inner().id_to_token(i))
                .map_or(Value::Null, Value::from)
        };
        let config = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": token(spec.bos_token_id),
            "eos_token": token(spec.eos_token_id.first()),
            "add_bos_token": false,
            "add_eos_token": false,
            "clean_up_tokenization_spaces": false,
            "model_max_length": spec.max_position_embeddings,
        });
        write_json(&dir.join("tokenizer_config.json"), &config)?;
    }
    let generation = dir.join("generation_config.json");
    if !generation.is_file() {
        let g = json!({
            "bos_token_id": spec.bos_token_id,
            "eos_token_id": &spec.eos_token_id,
        });
        write_json(&generation, &g)?;
    }
    Ok(())
}

/// `model.safetensors.index.json`.
pub fn write_index(dir: &Path, weight_map: &BTreeMap<String, String>, total: u64) -> Result<()> {
    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    write_json(&dir.join(crate::model::safetensors::INDEX_FILE), &index)
}
