//! Model ingest: Hugging Face directories (config.json + safetensors + tokenizer.json) and GGUF
//! files, both turned into one validated [`ModelSpec`], a lazy [`WeightSource`] that hands out
//! FP32 tensors by their Hugging Face name, and a [`Tokenizer`].
//!
//! Tensor names are always the Hugging Face ones (`model.layers.3.self_attn.q_proj.weight`);
//! the GGUF reader maps llama.cpp names onto them and undoes llama.cpp's q/k row permutation,
//! so every later stage sees one naming and one layout (linear weights row-major `[out, in]`).

pub mod compressed;
pub mod config;
pub mod config_keys;
pub mod eos;
pub mod gguf;
pub(crate) mod gguf_header;
pub mod gguf_moe;
mod gguf_rope;
pub mod llama_cpp;
pub mod moe;
pub mod rope;
pub mod safetensors;
pub mod synthetic;
pub mod tokenizer;
pub mod window;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

pub use self::eos::EosIds;
pub use self::tokenizer::Tokenizer;
pub use self::window::SlidingWindow;

/// Architectures fpx knows how to build a graph for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
    /// Qwen2 without q/k/v biases, with a per-head RMSNorm of q and k before RoPE.
    Qwen3,
    /// Qwen3 with mixture-of-experts MLPs ([`moe`]).
    #[serde(rename = "qwen3_moe")]
    Qwen3Moe,
    /// Mistral with mixture-of-experts MLPs ([`moe`]).
    Mixtral,
}

/// Validated hyper-parameters of a decoder-only transformer. Deserialized (from a calibration
/// file) it must pass [`config::validate_spec`] again before use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rope_theta: f32,
    /// RoPE frequency scaling (`rope_scaling` / `rope_parameters`); absent from the JSON of a
    /// spec without scaling, so older calibration files and model identities are unchanged.
    #[serde(default, skip_serializing_if = "rope::RopeScaling::is_default")]
    pub rope_scaling: rope::RopeScaling,
    pub rms_norm_eps: f32,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry biases (Qwen2; Llama and Qwen3 with `attention_bias`, where
    /// o_proj has one too: [`ModelSpec::o_proj_bias`]).
    pub attention_bias: bool,
    pub max_position_embeddings: usize,
    /// Windowed attention (Mistral, Qwen2/Qwen3 with `use_sliding_window`); absent from the
    /// JSON when every layer attends the whole context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<SlidingWindow>,
    pub bos_token_id: Option<u32>,
    /// Generation stops at any of these.
    #[serde(default)]
    pub eos_token_id: EosIds,
    /// Mixture-of-experts MLPs (Qwen3-MoE, Mixtral); absent from the JSON of a dense model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moe: Option<moe::MoeSpec>,
}

impl ModelSpec {
    /// The model's rotary embedding: base and scaling.
    pub fn rope(&self) -> rope::Rope {
        rope::Rope {
            theta: self.rope_theta,
            scaling: self.rope_scaling.clone(),
        }
    }

    /// Whether q and k are RMS-normalised per head before RoPE (`self_attn.q_norm`,
    /// `self_attn.k_norm`, weights of `head_dim`).
    pub fn qk_norm(&self) -> bool {
        matches!(
            self.architecture,
            Architecture::Qwen3 | Architecture::Qwen3Moe
        )
    }

    /// The MoE block of decoder layer `layer` (`None`: a dense MLP).
    pub fn moe_of(&self, layer: usize) -> Option<&moe::MoeSpec> {
        self.moe.as_ref().filter(|m| m.is_moe_layer(layer))
    }

    /// Whether o_proj has a bias: transformers' Llama and Qwen3 give it one with
    /// `attention_bias` (Qwen2's o_proj never has one).
    pub fn o_proj_bias(&self) -> bool {
        self.attention_bias
            && matches!(
                self.architecture,
                Architecture::Llama | Architecture::Qwen3 | Architecture::Qwen3Moe
            )
    }

    /// The attention window of decoder layer `layer` (`None`: the whole context).
    pub fn attention_window(&self, layer: usize) -> Option<usize> {
        self.sliding_window.as_ref().and_then(|w| w.of_layer(layer))
    }
}

/// A dense FP32 tensor, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Where weights come from. Tensors are produced on demand (memory-mapped or dequantized on
/// request), so a caller can stream one decoder block at a time.
pub trait WeightSource: Send + Sync {
    /// The FP32 tensor with this Hugging Face name.
    fn tensor(&self, name: &str) -> Result<Tensor>;
    /// Shape of a tensor without materialising it.
    fn shape(&self, name: &str) -> Result<Vec<usize>>;
    /// Whether a tensor with this name exists.
    fn contains(&self, name: &str) -> bool;
    /// All Hugging Face tensor names, sorted.
    fn names(&self) -> Vec<String>;
    /// The type a tensor is stored in (`BF16`, `F16`, `F32`, a GGUF block type), when known.
    fn stored_dtype(&self, _name: &str) -> Option<String> {
        None
    }
}

/// Where a [`Model`] was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// A directory with `config.json`, safetensors and `tokenizer.json`.
    HuggingFace,
    /// A single llama.cpp GGUF file.
    Gguf,
}

/// A loaded checkpoint: validated spec, lazy weights, tokenizer.
pub struct Model {
    pub path: PathBuf,
    pub kind: SourceKind,
    pub spec: ModelSpec,
    pub weights: Box<dyn WeightSource>,
    pub tokenizer: Tokenizer,
    /// Hex SHA-256 over the config (canonical JSON of [`ModelSpec`]) and every tensor header
    /// (name, stored dtype, shape), sorted by name. Stable across runs and machines; changes
    /// when the checkpoint's structure or storage types change.
    pub identity: String,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("path", &self.path)
            .field("kind", &self.kind)
            .field("spec", &self.spec)
            .field("tensors", &self.weights.names().len())
            .field("identity", &self.identity)
            .finish()
    }
}

/// What the file says about one tensor before it is read.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TensorHeader {
    pub file: PathBuf,
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Whether fpx can convert the stored type to FP32.
    pub supported: bool,
}

/// Hugging Face names of every tensor the decoder needs, with their expected shapes:
/// linear weights `[out, in]`, biases `[out]`, norms `[hidden]` (q/k norms `[head_dim]`),
/// embedding `[vocab, hidden]`,
/// `lm_head.weight` only when embeddings are not tied. Order: embedding, layers in order,
/// final norm, lm_head.
pub fn expected_tensors(spec: &ModelSpec) -> Vec<(String, Vec<usize>)> {
    let h = spec.hidden_size;
    let q = spec.num_heads * spec.head_dim;
    let kv = spec.num_kv_heads * spec.head_dim;
    let ffn = spec.intermediate_size;
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![spec.vocab_size, h],
    )];
    for i in 0..spec.num_layers {
        let p = format!("model.layers.{i}");
        out.push((format!("{p}.input_layernorm.weight"), vec![h]));
        for (proj, rows) in [("q", q), ("k", kv), ("v", kv)] {
            out.push((format!("{p}.self_attn.{proj}_proj.weight"), vec![rows, h]));
            if spec.attention_bias {
                out.push((format!("{p}.self_attn.{proj}_proj.bias"), vec![rows]));
            }
        }
        if spec.qk_norm() {
            for norm in ["q_norm", "k_norm"] {
                out.push((format!("{p}.self_attn.{norm}.weight"), vec![spec.head_dim]));
            }
        }
        out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
        if spec.o_proj_bias() {
            out.push((format!("{p}.self_attn.o_proj.bias"), vec![h]));
        }
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        match (spec.moe_of(i), moe::MoeNames::of(spec.architecture)) {
            (Some(m), Some(names)) => {
                out.push((format!("{}.weight", names.router(i)), vec![m.experts, h]));
                for e in 0..m.experts {
                    let [gate, up, down] = names.expert(i, e);
                    let f = m.expert_ffn;
                    out.push((format!("{gate}.weight"), vec![f, h]));
                    out.push((format!("{up}.weight"), vec![f, h]));
                    out.push((format!("{down}.weight"), vec![h, f]));
                }
            }
            _ => {
                out.push((format!("{p}.mlp.gate_proj.weight"), vec![ffn, h]));
                out.push((format!("{p}.mlp.up_proj.weight"), vec![ffn, h]));
                out.push((format!("{p}.mlp.down_proj.weight"), vec![h, ffn]));
            }
        }
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !spec.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![spec.vocab_size, h]));
    }
    out
}

/// Refuses a tensor holding NaN or infinity, naming it: such a weight poisons every
/// output it reaches, and fpx would otherwise report a NaN perplexity or a zero error.
pub(crate) fn check_finite(path: &Path, tensor: &str, data: &[f32]) -> Result<()> {
    let bad = data.iter().filter(|v| !v.is_finite()).count();
    if bad > 0 {
        let first = data.iter().position(|v| !v.is_finite()).unwrap_or(0);
        return Err(Error::Tensor {
            path: path.to_path_buf(),
            tensor: tensor.to_string(),
            reason: format!(
                "{bad} non-finite values (NaN or infinity), the first at element {first} ({})",
                data[first]
            ),
        });
    }
    Ok(())
}

/// Load a checkpoint: a Hugging Face directory or a `.gguf` file.
///
/// Validates the spec, and that every tensor in [`expected_tensors`] exists with the right
/// shape and a supported storage type, so later stages cannot hit a missing tensor. No
/// tensor data is read (the files are memory-mapped).
pub fn load_model(path: &Path) -> Result<Model> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return load_hf(path);
    }
    // A FIFO or device would block the magic-byte read below (or never end).
    crate::fsutil::open_regular(path)?;
    let is_gguf_name = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    if is_gguf_name || has_gguf_magic(path) {
        return load_gguf(path);
    }
    Err(Error::File {
        path: path.to_path_buf(),
        what: "model",
        reason: "expected a directory with config.json or a .gguf file".into(),
    })
}

fn has_gguf_magic(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"GGUF"
}

fn load_hf(dir: &Path) -> Result<Model> {
    let config_path = dir.join("config.json");
    let mut spec = config::load_config(&config_path)?;
    generation_eos(&dir.join("generation_config.json"), &mut spec)?;
    // Decodes compressed-tensors FP8/FP4 layers; a pass-through for plain checkpoints.
    let source = compressed::CompressedSource::open(
        &config_path,
        safetensors::SafetensorsSource::open(dir)?,
    )?;
    let headers = check_tensors(&spec, dir, &source, |n| source.header(n))?;
    let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
    check_vocab(&spec, &tokenizer, &dir.join("tokenizer.json"))?;
    Ok(Model {
        path: dir.to_path_buf(),
        kind: SourceKind::HuggingFace,
        identity: identity(&spec, &headers),
        spec,
        weights: Box::new(source),
        tokenizer,
    })
}

/// Adds the `eos_token_id`s of `generation_config.json` (when the file exists) to the spec's:
/// transformers' `generate` stops at those, and Llama 3 lists more there than in config.json.
fn generation_eos(path: &Path, spec: &mut ModelSpec) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    #[derive(Deserialize)]
    struct Generation {
        #[serde(default)]
        eos_token_id: EosIds,
    }
    let bad = |reason: String| Error::Config {
        path: path.to_path_buf(),
        reason,
    };
    let g: Generation = serde_json::from_slice(&crate::fsutil::read_regular(path)?)
        .map_err(|e| bad(e.to_string()))?;
    spec.eos_token_id
        .extend(g.eos_token_id.ids().iter().copied());
    config::validate_spec(spec).map_err(bad)
}

fn load_gguf(path: &Path) -> Result<Model> {
    let file = gguf::GgufSource::open(path)?;
    gguf_model(path, file)
}

/// A [`Model`] from an opened GGUF file: tensor checks and the tokenizer of its metadata.
pub(crate) fn gguf_model(path: &Path, file: gguf::GgufFile) -> Result<Model> {
    let source = file.source;
    let headers = check_tensors(&file.spec, path, &source, |n| source.header(n))?;
    let tokenizer = Tokenizer::from_gguf_metadata(path, &file.metadata)?;
    check_vocab(&file.spec, &tokenizer, path)?;
    Ok(Model {
        path: path.to_path_buf(),
        kind: SourceKind::Gguf,
        identity: identity(&file.spec, &headers),
        spec: file.spec,
        weights: Box::new(source),
        tokenizer,
    })
}

/// Every expected tensor present, with its shape and a supported type. Returns the headers
/// of all tensors in the source (for the identity), sorted by name.
fn check_tensors(
    spec: &ModelSpec,
    path: &Path,
    source: &dyn WeightSource,
    header: impl Fn(&str) -> Option<TensorHeader>,
) -> Result<Vec<(String, TensorHeader)>> {
    for (name, shape) in expected_tensors(spec) {
        let h = header(&name).ok_or_else(|| Error::MissingTensor {
            path: path.to_path_buf(),
            tensor: name.clone(),
        })?;
        if h.shape != shape {
            return Err(Error::ShapeMismatch {
                path: h.file,
                tensor: name,
                expected: shape,
                found: h.shape,
            });
        }
        if !h.supported {
            return Err(Error::UnsupportedDtype {
                path: h.file,
                tensor: name,
                dtype: h.dtype,
            });
        }
    }
    Ok(source
        .names()
        .into_iter()
        .filter_map(|n| header(&n).map(|h| (n, h)))
        .collect())
}

fn check_vocab(spec: &ModelSpec, tok: &Tokenizer, path: &Path) -> Result<()> {
    if tok.vocab_size() > spec.vocab_size {
        return Err(Error::Tokenizer {
            path: path.to_path_buf(),
            reason: format!(
                "{} token ids but the embedding has only {} rows",
                tok.vocab_size(),
                spec.vocab_size
            ),
        });
    }
    Ok(())
}

/// SHA-256 over the canonical spec JSON and the sorted tensor headers.
fn identity(spec: &ModelSpec, headers: &[(String, TensorHeader)]) -> String {
    let mut h = Sha256::new();
    h.update(serde_json::to_vec(spec).expect("spec serializes"));
    for (name, t) in headers {
        h.update(b"\n");
        h.update(name.as_bytes());
        h.update(b"\t");
        h.update(t.dtype.as_bytes());
        h.update(format!("\t{:?}", t.shape).as_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::synthetic::{
        random_weights, tiny_spec, write_gguf, write_hf_checkpoint, GgmlDType, HfDtype,
    };
    use super::*;

    const ARCHES: [Architecture; 4] = [
        Architecture::Llama,
        Architecture::Mistral,
        Architecture::Qwen2,
        Architecture::Qwen3,
    ];

    #[test]
    fn expected_tensors_follow_the_spec() {
        let llama = expected_tensors(&tiny_spec(Architecture::Llama));
        // embed + 2 layers x 9 + norm; tied, no biases.
        assert_eq!(llama.len(), 1 + 2 * 9 + 1);
        assert!(!llama.iter().any(|(n, _)| n == "lm_head.weight"));
        let qwen = expected_tensors(&tiny_spec(Architecture::Qwen2));
        assert_eq!(qwen.len(), 1 + 2 * 12 + 2);
        let shape = |name: &str| qwen.iter().find(|(n, _)| n == name).unwrap().1.clone();
        assert_eq!(
            shape("model.layers.1.self_attn.k_proj.weight"),
            vec![32, 64]
        );
        assert_eq!(shape("model.layers.1.self_attn.k_proj.bias"), vec![32]);
        assert_eq!(
            shape("model.layers.0.self_attn.o_proj.weight"),
            vec![64, 64]
        );
        assert_eq!(shape("model.layers.0.mlp.down_proj.weight"), vec![64, 128]);
        assert_eq!(shape("lm_head.weight"), vec![300, 64]);
    }

    #[test]
    fn hf_and_gguf_of_the_same_weights_agree() {
        for arch in ARCHES {
            let spec = tiny_spec(arch);
            let dir = tempfile::tempdir().unwrap();
            let hf_dir = dir.path().join("hf");
            let gguf_path = dir.path().join("m.gguf");
            write_hf_checkpoint(&hf_dir, &spec, 21, HfDtype::F32, 2).unwrap();
            write_gguf(&gguf_path, &spec, 21, GgmlDType::F32).unwrap();
            let hf = load_model(&hf_dir).unwrap();
            let gg = load_model(&gguf_path).unwrap();
            assert_eq!(hf.kind, SourceKind::HuggingFace);
            assert_eq!(gg.kind, SourceKind::Gguf);
            assert_eq!(hf.spec, spec);
            // llama.cpp has no `mistral` architecture: a Mistral GGUF reads back as llama.
            let gguf_spec = ModelSpec {
                architecture: if arch == Architecture::Mistral {
                    Architecture::Llama
                } else {
                    arch
                },
                ..spec.clone()
            };
            assert_eq!(gg.spec, gguf_spec);
            for (name, want) in random_weights(&spec, 21) {
                assert_eq!(hf.weights.tensor(&name).unwrap(), want, "{arch:?} {name}");
                assert_eq!(gg.weights.tensor(&name).unwrap(), want, "{arch:?} {name}");
            }
            let text = "The whale, and the sea: 1851 and all that.";
            let ids = hf.tokenizer.encode(text).unwrap();
            assert_eq!(gg.tokenizer.encode(text).unwrap(), ids);
            assert_eq!(hf.tokenizer.decode(&ids).unwrap(), text);
            assert_eq!(hf.tokenizer.vocab_size(), spec.vocab_size);
            // Same spec, names, stored types and shapes: same identity, whatever the container.
            assert_eq!(hf.identity == gg.identity, arch != Architecture::Mistral);
        }
    }

    #[test]
    fn identity_is_stable_and_tracks_structure() {
        let dir = tempfile::tempdir().unwrap();
        let spec = tiny_spec(Architecture::Llama);
        let (a, b, c) = (
            dir.path().join("a"),
            dir.path().join("b"),
            dir.path().join("c"),
        );
        write_hf_checkpoint(&a, &spec, 1, HfDtype::BF16, 1).unwrap();
        // Other weights, same structure: same identity (headers only, by design).
        write_hf_checkpoint(&b, &spec, 2, HfDtype::BF16, 3).unwrap();
        write_hf_checkpoint(&c, &spec, 1, HfDtype::F16, 1).unwrap();
        let id = |p: &Path| load_model(p).unwrap().identity;
        assert_eq!(id(&a), id(&a));
        assert_eq!(id(&a).len(), 64);
        assert_eq!(id(&a), id(&b));
        assert_ne!(id(&a), id(&c));
    }

    /// The real SmolLM2-135M GGUF (see DESIGN.md "Real inputs"); skipped when absent.
    #[test]
    fn real_smollm2_gguf_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
        if !path.is_file() {
            eprintln!("skipping: {} not present", path.display());
            return;
        }
        let m = load_model(&path).unwrap();
        let s = &m.spec;
        assert_eq!(s.architecture, Architecture::Llama);
        assert_eq!(
            (s.num_layers, s.hidden_size, s.num_heads, s.num_kv_heads),
            (30, 576, 9, 3)
        );
        assert_eq!(
            (s.intermediate_size, s.vocab_size, s.head_dim),
            (1536, 49152, 64)
        );
        assert!(s.tie_word_embeddings && !s.attention_bias);
        assert_eq!(s.rope_theta, 100_000.0);
        assert_eq!((s.bos_token_id, s.eos_token_id.ids()), (Some(1), &[2][..]));
        assert_eq!(m.tokenizer.vocab_size(), 49152);
        let text = "Call me Ishmael.";
        let ids = m.tokenizer.encode(text).unwrap();
        assert!(!ids.is_empty() && ids[0] != 1, "no BOS: {ids:?}");
        assert_eq!(m.tokenizer.decode(&ids).unwrap(), text);
        let q = m
            .weights
            .tensor("model.layers.0.self_attn.q_proj.weight")
            .unwrap();
        assert_eq!(q.shape, vec![576, 576]);
        assert!(q.data.iter().all(|x| x.is_finite()));
        let e = m.weights.tensor("model.embed_tokens.weight").unwrap();
        assert_eq!(e.shape, vec![49152, 576]);
    }
}
