//! Tokenizers: Hugging Face `tokenizer.json` files, and byte-level BPE vocabularies stored in
//! GGUF metadata, both run by the `tokenizers` crate.
//!
//! A GGUF vocabulary (`tokenizer.ggml.model == "gpt2"`) is turned into the `tokenizer.json`
//! Hugging Face would ship for it ([`bpe_tokenizer_json`]): the tokens and merges as a BPE
//! model, control tokens (type 3) as special added tokens, user-defined ones (type 4) as
//! plain added tokens, and a pre-tokenizer chosen by `tokenizer.ggml.pre`:
//! - `smollm`: exactly SmolLM2's (`Digits(individual_digits)` then `ByteLevel`);
//! - `qwen2`, `llama-bpe`: their splitting regex, then `ByteLevel` without a regex;
//! - anything else: `ByteLevel` with the GPT-2 regex.
//!
//! SentencePiece vocabularies (`llama`) are not supported. [`Tokenizer::encode`] never adds
//! BOS or other special tokens.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::quantized::gguf_file::Value;
use serde_json::{json, Value as Json};

use crate::error::{Error, Result};

/// Splitting regex of Qwen2's tokenizer.json.
pub const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Splitting regex of Llama 3's tokenizer.json.
pub const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token types (llama.cpp `LLAMA_TOKEN_TYPE_*`).
pub const TOKEN_NORMAL: i32 = 1;
pub const TOKEN_CONTROL: i32 = 3;
pub const TOKEN_USER_DEFINED: i32 = 4;

/// A text tokenizer; ids are those of the model's embedding table.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

fn tok_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Tokenizer {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

impl Tokenizer {
    /// Load a Hugging Face `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(tok_err(path, "file not found"));
        }
        let inner =
            tokenizers::Tokenizer::from_file(path).map_err(|e| tok_err(path, e.to_string()))?;
        Ok(Tokenizer {
            inner,
            path: path.to_path_buf(),
        })
    }

    /// Build the tokenizer stored in GGUF metadata (`path` is only for error messages).
    pub fn from_gguf_metadata(path: &Path, meta: &HashMap<String, Value>) -> Result<Self> {
        let model = match meta.get("tokenizer.ggml.model") {
            Some(Value::String(s)) => s.as_str(),
            _ => return Err(tok_err(path, "no tokenizer.ggml.model in the metadata")),
        };
        if model != "gpt2" {
            return Err(tok_err(
                path,
                format!("unsupported tokenizer model `{model}` (only gpt2-style byte-level BPE)"),
            ));
        }
        let strings = |key: &str| -> Result<Vec<String>> {
            match meta.get(key) {
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|v| match v {
                        Value::String(s) => Ok(s.clone()),
                        _ => Err(tok_err(path, format!("{key} holds a non-string"))),
                    })
                    .collect(),
                Some(_) => Err(tok_err(path, format!("{key} is not an array"))),
                None => Err(tok_err(path, format!("missing {key}"))),
            }
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types = match meta.get("tokenizer.ggml.token_type") {
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match *v {
                    Value::I32(t) => Ok(t),
                    Value::U32(t) => Ok(t as i32),
                    _ => Err(tok_err(
                        path,
                        "tokenizer.ggml.token_type holds a non-integer",
                    )),
                })
                .collect::<Result<Vec<i32>>>()?,
            _ => vec![TOKEN_NORMAL; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(tok_err(
                path,
                format!("{} token types for {} tokens", types.len(), tokens.len()),
            ));
        }
        let pre = match meta.get("tokenizer.ggml.pre") {
            Some(Value::String(s)) => s.as_str(),
            _ => "default",
        };
        let json = bpe_tokenizer_json(&tokens, &types, &merges, pre);
        let text = serde_json::to_string(&json).map_err(|e| tok_err(path, e.to_string()))?;
        let inner =
            tokenizers::Tokenizer::from_str(&text).map_err(|e| tok_err(path, e.to_string()))?;
        Ok(Tokenizer {
            inner,
            path: path.to_path_buf(),
        })
    }

    /// Token ids of `text`; no BOS and no other special token is added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| tok_err(&self.path, format!("encode: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids` (special tokens are kept in the output).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| tok_err(&self.path, format!("decode: {e}")))
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token string, if the vocabulary has it.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

fn byte_level(trim_offsets: bool, use_regex: bool) -> Json {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": trim_offsets, "use_regex": use_regex})
}

fn split_then_byte_level(regex: &str) -> Json {
    json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
        byte_level(false, false),
    ]})
}

/// The pre-tokenizer Hugging Face uses for a llama.cpp `tokenizer.ggml.pre` value.
pub fn pre_tokenizer_json(pre: &str) -> Json {
    match pre {
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            byte_level(true, true),
        ]}),
        "qwen2" => split_then_byte_level(QWEN2_REGEX),
        "llama-bpe" | "llama3" => split_then_byte_level(LLAMA3_REGEX),
        _ => byte_level(true, true),
    }
}

/// A complete `tokenizer.json` for a byte-level BPE vocabulary (tokens already in GPT-2's
/// byte-to-unicode alphabet, merges as `"a b"` strings, llama.cpp token types).
pub fn bpe_tokenizer_json(tokens: &[String], types: &[i32], merges: &[String], pre: &str) -> Json {
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    let mut added = Vec::new();
    for (id, (tok, &ty)) in tokens.iter().zip(types).enumerate() {
        // First occurrence wins if a vocabulary repeats a string.
        vocab.entry(tok.clone()).or_insert(json!(id));
        if ty == TOKEN_CONTROL || ty == TOKEN_USER_DEFINED {
            added.push(json!({
                "id": id, "content": tok, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": ty == TOKEN_CONTROL,
            }));
        }
    }
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer_json(pre),
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        },
    })
}

/// GPT-2's map from bytes to printable characters (the alphabet of byte-level BPE tokens).
pub fn byte_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let c = if printable {
            b
        } else {
            let c = next;
            next += 1;
            c
        };
        table[b as usize] = char::from_u32(c).expect("valid code point");
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::synthetic::synthetic_vocab;

    fn meta(pre: &str, model: &str) -> HashMap<String, Value> {
        let (tokens, types, merges) = synthetic_vocab(300).unwrap();
        let strs = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
        HashMap::from([
            (
                "tokenizer.ggml.model".to_string(),
                Value::String(model.into()),
            ),
            ("tokenizer.ggml.pre".to_string(), Value::String(pre.into())),
            ("tokenizer.ggml.tokens".to_string(), strs(tokens)),
            ("tokenizer.ggml.merges".to_string(), strs(merges)),
            (
                "tokenizer.ggml.token_type".to_string(),
                Value::Array(types.into_iter().map(Value::I32).collect()),
            ),
        ])
    }

    #[test]
    fn byte_table_matches_gpt2() {
        let t = byte_to_unicode();
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[b'a' as usize], 'a');
        let distinct: std::collections::HashSet<_> = t.iter().collect();
        assert_eq!(distinct.len(), 256);
    }

    #[test]
    fn gguf_bpe_round_trips_for_each_pre_tokenizer() {
        let text = "The cat sat on the mat, in 1851; it's 42 degrees.\nÉté — naïve café!";
        for pre in ["smollm", "qwen2", "llama-bpe", "gpt2"] {
            let tok =
                Tokenizer::from_gguf_metadata(Path::new("x.gguf"), &meta(pre, "gpt2")).unwrap();
            assert_eq!(tok.vocab_size(), 300);
            let ids = tok.encode(text).unwrap();
            assert_eq!(tok.decode(&ids).unwrap(), text, "{pre}");
            // Merges apply: " the" is one token.
            let the = tok.token_to_id("Ġthe").unwrap();
            assert!(tok.encode(" the").unwrap() == vec![the], "{pre}");
        }
        let smol =
            Tokenizer::from_gguf_metadata(Path::new("x.gguf"), &meta("smollm", "gpt2")).unwrap();
        // Digits are split one by one.
        assert_eq!(smol.encode("1851").unwrap().len(), 4);
    }

    #[test]
    fn special_tokens_match_but_are_not_added() {
        let tok =
            Tokenizer::from_gguf_metadata(Path::new("x.gguf"), &meta("smollm", "gpt2")).unwrap();
        let eot = tok.token_to_id("<|endoftext|>").unwrap();
        assert_eq!(eot, 0);
        let ids = tok.encode("hi<|endoftext|>").unwrap();
        assert_eq!(*ids.last().unwrap(), eot);
        assert!(!tok.encode("hi").unwrap().contains(&eot));
    }

    #[test]
    fn sentencepiece_is_rejected() {
        let err = Tokenizer::from_gguf_metadata(Path::new("m.gguf"), &meta("default", "llama"))
            .unwrap_err();
        assert!(
            err.to_string().contains("unsupported tokenizer model"),
            "{err}"
        );
    }
}
