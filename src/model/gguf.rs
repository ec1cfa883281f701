//! GGUF checkpoints as llama.cpp writes them (architectures `llama`, `qwen2`, `qwen3`,
//! `qwen3moe`, and `llama` with experts: Mixtral; the experts as [`super::gguf_moe`] reads
//! them).
//!
//! The file stays memory-mapped; [`GgufSource::tensor`] dequantizes one tensor per call
//! (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) and nothing is cached.
//! Three llama.cpp conventions are undone here so that later stages see a Hugging Face
//! checkpoint:
//! - names: `blk.N.attn_q.weight` becomes `model.layers.N.self_attn.q_proj.weight`, etc.;
//! - shapes: GGUF lists dims innermost first, so `[in, out]` there is row-major `[out, in]`;
//! - q/k rows: `convert_hf_to_gguf.py` permutes the rows of q_proj and k_proj of llama models
//!   (`permute(w, n_head, n_head_kv)`) for its RoPE layout; [`unpermute_rows`] inverts it.
//!   Qwen2 and Qwen3 GGUFs are not permuted (nor are Qwen3's q/k norms).
//!
//! The spec comes from `{arch}.*` metadata; the tokenizer metadata is handed to
//! [`super::tokenizer`]. RoPE scaling: `rope.scaling.type = linear` with its factor, and
//! llama3's as llama.cpp stores it, a `rope_freqs.weight` tensor of frequency factors
//! ([`RopeScaling::Factors`], llama only, as llama.cpp reads it). End-of-sequence ids: the
//! `eos`, `eot` (end of turn) and `eom` (end of message) tokens, all of which end
//! generation in llama.cpp.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;
use memmap2::Mmap;

use super::config::validate_spec;
use super::gguf_header::{self, as_f64, as_usize};
use super::gguf_moe::{self, MoeTensor};
use super::gguf_rope::{read_vector, rope_scaling, ReadFactors};
pub use super::llama_cpp::{gguf_name, hf_name, permute_rows, unpermute_rows};
use super::{Architecture, EosIds, ModelSpec, Tensor, TensorHeader, WeightSource};
use crate::error::{Error, Result};

/// GGUF architectures fpx reads, as a message for errors.
pub const SUPPORTED_GGUF: &str = "llama (Mixtral: llama with experts), qwen2, qwen3, qwen3moe";

pub use super::gguf_rope::ROPE_FREQS;

struct Entry {
    gguf_name: String,
    type_id: u32,
    dtype: Option<GgmlDType>,
    /// Hugging Face order (outermost first).
    shape: Vec<usize>,
    /// Absolute byte range in the file (only for supported types).
    range: Option<(usize, usize)>,
    /// Rows were permuted by llama.cpp in groups of this many heads.
    permuted_heads: Option<usize>,
}

/// The bytes of a GGUF file: a memory map, or (for tests and fuzzing) bytes in memory.
pub type Bytes = Box<dyn std::ops::Deref<Target = [u8]> + Send + Sync>;

/// Weights of a GGUF file, by Hugging Face name.
pub struct GgufSource {
    path: PathBuf,
    mmap: Bytes,
    entries: BTreeMap<String, Entry>,
}

/// An opened GGUF file: weights, the spec from its metadata, and the metadata itself
/// (for the tokenizer).
pub struct GgufFile {
    pub source: GgufSource,
    pub spec: ModelSpec,
    pub metadata: HashMap<String, Value>,
}

pub(super) fn config_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Config {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn spec_from_metadata(
    path: &Path,
    meta: &HashMap<String, Value>,
    has: &dyn Fn(&str) -> bool,
    rope_freqs: ReadFactors<'_>,
    embed_rows: Option<usize>,
) -> Result<ModelSpec> {
    let arch_name = match meta.get("general.architecture") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(config_err(path, "general.architecture is not a string")),
        None => {
            return Err(config_err(
                path,
                "missing metadata key general.architecture",
            ))
        }
    };
    let key = |k: &str| format!("{arch_name}.{k}");
    let opt_usize = |k: &str| -> Result<Option<usize>> {
        match meta.get(&key(k)) {
            None => Ok(None),
            Some(v) => as_usize(v)
                .map(Some)
                .ok_or_else(|| config_err(path, format!("{} is not an unsigned integer", key(k)))),
        }
    };
    let req_usize = |k: &str| -> Result<usize> {
        opt_usize(k)?.ok_or_else(|| config_err(path, format!("missing metadata key {}", key(k))))
    };
    let opt_f64 = |k: &str| -> Result<Option<f64>> {
        match meta.get(&key(k)) {
            None => Ok(None),
            Some(v) => as_f64(v)
                .map(Some)
                .ok_or_else(|| config_err(path, format!("{} is not a number", key(k)))),
        }
    };
    let architecture = match arch_name.as_str() {
        "llama" => gguf_moe::llama_or_mixtral(opt_usize("expert_count")?),
        "qwen2" => Architecture::Qwen2,
        "qwen3" => Architecture::Qwen3,
        "qwen3moe" => Architecture::Qwen3Moe,
        _ => {
            return Err(Error::UnsupportedArchitecture {
                path: path.to_path_buf(),
                arch: arch_name,
                supported: SUPPORTED_GGUF,
            })
        }
    };
    let rope_scaling = rope_scaling(path, meta, &arch_name, rope_freqs, &opt_f64)?;
    let hidden = req_usize("embedding_length")?;
    let heads = req_usize("attention.head_count")?;
    let kv_heads = opt_usize("attention.head_count_kv")?.unwrap_or(heads);
    let head_dim = match (
        opt_usize("attention.key_length")?,
        opt_usize("rope.dimension_count")?,
    ) {
        (Some(d), _) | (None, Some(d)) => d,
        (None, None) if heads > 0 => hidden / heads,
        _ => 0,
    };
    let n_tokens = match meta.get("tokenizer.ggml.tokens") {
        Some(Value::Array(a)) => Some(a.len()),
        _ => None,
    };
    let vocab = opt_usize("vocab_size")?
        .or(n_tokens)
        .or(embed_rows)
        .ok_or_else(|| config_err(path, "cannot tell the vocabulary size"))?;
    let token_id = |k: &str| meta.get(k).and_then(as_usize).map(|v| v as u32);
    let eos = ["eos", "eot", "eom"].map(|t| token_id(&format!("tokenizer.ggml.{t}_token_id")));
    let (layers, ffn) = (req_usize("block_count")?, req_usize("feed_forward_length")?);
    let moe = gguf_moe::moe_spec(
        path,
        architecture,
        layers,
        ffn,
        &opt_usize,
        &|k| match meta.get(&key(k)) {
            Some(Value::Bool(b)) => Some(*b),
            _ => None,
        },
        has,
    )?;
    let spec = ModelSpec {
        architecture,
        hidden_size: hidden,
        intermediate_size: ffn,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
        vocab_size: vocab,
        rope_theta: opt_f64("rope.freq_base")?.unwrap_or(10_000.0) as f32,
        rope_scaling,
        rms_norm_eps: opt_f64("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-6) as f32,
        tie_word_embeddings: !has("output.weight"),
        attention_bias: has("blk.0.attn_q.bias"),
        max_position_embeddings: opt_usize("context_length")?.unwrap_or(2048),
        // llama.cpp's llama, qwen2, qwen3 and their MoE forms attend the whole context.
        sliding_window: None,
        bos_token_id: token_id("tokenizer.ggml.bos_token_id"),
        eos_token_id: EosIds::new(eos.into_iter().flatten()),
        moe,
    };
    validate_spec(&spec).map_err(|r| config_err(path, r))?;
    Ok(spec)
}

impl GgufSource {
    /// Open a GGUF file: parse its header, build the spec, map tensor names.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = crate::fsutil::open_regular(path)?;
        // SAFETY: read-only map; the file is assumed not to change while fpx runs.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::from_bytes(path, Box::new(mmap))
    }

    /// The same from bytes already in memory (`path` names them in errors).
    pub fn from_bytes(path: &Path, mmap: Bytes) -> Result<GgufFile> {
        let corrupt = |reason: String| Error::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let header = gguf_header::parse(&mmap).map_err(corrupt)?;
        let raw: HashMap<&str, &gguf_header::RawTensorInfo> = header
            .tensors
            .iter()
            .map(|t| (t.name.as_str(), t))
            .collect();
        let embed_rows = raw
            .get("token_embd.weight")
            .and_then(|t| t.dims.last().copied());
        let (bytes, offset): (&[u8], usize) = (&mmap, header.data_offset);
        let read_factors = raw
            .get(ROPE_FREQS)
            .map(|t| move || read_vector(path, bytes, offset, t));
        let spec = spec_from_metadata(
            path,
            &header.metadata,
            &|name| raw.contains_key(name),
            read_factors
                .as_ref()
                .map(|f| f as &dyn Fn() -> Result<Vec<f32>>),
            embed_rows,
        )?;
        // Mixtral converts as a llama model, q/k permutation included.
        let permute = matches!(
            spec.architecture,
            Architecture::Llama | Architecture::Mixtral
        );
        let experts = spec.moe.as_ref().map_or(0, |m| m.experts);

        let mut entries = BTreeMap::new();
        for t in &header.tensors {
            let moe = gguf_moe::moe_tensor(&t.name, spec.architecture, experts);
            let stack = matches!(moe, Some(MoeTensor::Experts(_)));
            let names = match moe {
                Some(MoeTensor::Router(name)) => vec![name],
                Some(MoeTensor::Experts(names)) => {
                    if t.dims.len() != 3 || t.dims[2] != experts {
                        return Err(corrupt(format!(
                            "tensor `{}` has dims {:?}; a stack of {experts} experts has 3 \
                             dims, the last {experts}",
                            t.name, t.dims
                        )));
                    }
                    names
                }
                None => vec![hf_name(&t.name).unwrap_or_else(|| t.name.clone())],
            };
            let dtype = gguf_header::supported_type(t.ggml_type);
            let n: usize = t.dims.iter().product::<usize>() / names.len();
            let shape: Vec<usize> = t.dims.iter().rev().copied().collect();
            // One expert of a stack: its [out, in] matrix.
            let shape = if stack { shape[1..].to_vec() } else { shape };
            let permuted_heads = if !permute {
                None
            } else if t.name.contains(".attn_q.") {
                Some(spec.num_heads)
            } else if t.name.contains(".attn_k.") {
                Some(spec.num_kv_heads)
            } else {
                None
            };
            for (i, name) in names.into_iter().enumerate() {
                let range = match dtype {
                    None => None,
                    Some(dt) => Some(
                        byte_range(&header, t, dt, n, i, mmap.len())
                            .map_err(|r| corrupt(format!("tensor `{}`: {r}", t.name)))?,
                    ),
                };
                let entry = Entry {
                    gguf_name: t.name.clone(),
                    type_id: t.ggml_type,
                    dtype,
                    shape: shape.clone(),
                    range,
                    permuted_heads,
                };
                if entries.insert(name.clone(), entry).is_some() {
                    return Err(corrupt(format!("tensor `{name}` appears twice")));
                }
            }
        }
        check_no_overlap(&entries).map_err(corrupt)?;
        let source = GgufSource {
            path: path.to_path_buf(),
            mmap,
            entries,
        };

        Ok(GgufFile {
            source,
            spec,
            metadata: header.metadata,
        })
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            tensor: describe(name),
        })
    }

    /// Header of one tensor (file, stored type, HF shape), if present.
    pub(crate) fn header(&self, name: &str) -> Option<TensorHeader> {
        let e = self.entries.get(name)?;
        Some(TensorHeader {
            file: self.path.clone(),
            dtype: gguf_header::type_name(e.type_id),
            shape: e.shape.clone(),
            supported: e.dtype.is_some(),
        })
    }
}

/// The bytes of the `index`-th of the equal `n`-element parts of tensor `t` (the whole
/// tensor, or one expert of a stack), absolute in a file of `len` bytes.
fn byte_range(
    header: &gguf_header::GgufHeader,
    t: &gguf_header::RawTensorInfo,
    dt: GgmlDType,
    n: usize,
    index: usize,
    len: usize,
) -> std::result::Result<(usize, usize), String> {
    let size = gguf_header::byte_size(dt, n)?;
    let start = size
        .checked_mul(index)
        .and_then(|o| o.checked_add(t.offset))
        .and_then(|o| o.checked_add(header.data_offset));
    let end = start.and_then(|s| s.checked_add(size));
    match (start, end) {
        (Some(s), Some(e)) if e <= len => Ok((s, e)),
        _ => Err(format!(
            "needs bytes up to {} but the file has {len} (truncated?)",
            end.map_or("overflow".to_string(), |e| e.to_string()),
        )),
    }
}

/// Tensors may not share bytes: llama.cpp never writes such a file, and reading one would
/// silently alias two weights.
fn check_no_overlap(entries: &BTreeMap<String, Entry>) -> std::result::Result<(), String> {
    let mut ranges: Vec<(usize, usize, &str)> = entries
        .values()
        .filter_map(|e| e.range.map(|(s, end)| (s, end, e.gguf_name.as_str())))
        .filter(|(s, end, _)| end > s)
        .collect();
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        let ((_, a_end, a), (b_start, _, b)) = (w[0], w[1]);
        if b_start < a_end {
            return Err(format!(
                "tensors `{a}` and `{b}` overlap (bytes {b_start}..{a_end})"
            ));
        }
    }
    Ok(())
}

/// `hf (gguf)` for error messages, so a user can find the tensor in either naming.
fn describe(hf: &str) -> String {
    match gguf_name(hf).or_else(|| gguf_moe::gguf_moe_name(hf)) {
        Some(g) => format!("{hf} ({g})"),
        None => hf.to_string(),
    }
}

impl WeightSource for GgufSource {
    fn tensor(&self, name: &str) -> Result<Tensor> {
        let e = self.entry(name)?;
        let (dtype, (start, end)) = match (e.dtype, e.range) {
            (Some(d), Some(r)) => (d, r),
            _ => {
                return Err(Error::UnsupportedDtype {
                    path: self.path.clone(),
                    tensor: format!("{name} ({})", e.gguf_name),
                    dtype: gguf_header::type_name(e.type_id),
                })
            }
        };
        let n: usize = e.shape.iter().product();
        let mut data = gguf_header::dequantize(dtype, &self.mmap[start..end], n);
        super::check_finite(&self.path, &describe(name), &data)?;
        if let Some(n_head) = e.permuted_heads {
            let rows = e.shape[0];
            if n_head == 0 || rows % n_head != 0 || (rows / n_head) % 2 != 0 {
                return Err(Error::Tensor {
                    path: self.path.clone(),
                    tensor: describe(name),
                    reason: format!("{rows} rows cannot be split into {n_head} rotary heads"),
                });
            }
            data = unpermute_rows(&data, rows, n_head);
        }
        Ok(Tensor {
            shape: e.shape.clone(),
            data,
        })
    }

    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.entry(name)?.shape.clone())
    }

    fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    fn names(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }

    fn stored_dtype(&self, name: &str) -> Option<String> {
        Some(gguf_header::type_name(self.entries.get(name)?.type_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::synthetic::{random_weights, tiny_spec, write_gguf};

    /// A spec whose rows fit K-quant blocks (256).
    fn wide_spec(arch: Architecture) -> ModelSpec {
        ModelSpec {
            hidden_size: 256,
            intermediate_size: 512,
            num_layers: 1,
            head_dim: 64,
            ..tiny_spec(arch)
        }
    }

    fn rel_rms(got: &[f32], want: &[f32]) -> f32 {
        let num: f32 = got.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum();
        let den: f32 = want.iter().map(|b| b * b).sum();
        (num / den).sqrt()
    }

    /// Writes a GGUF with `ty` linears and returns the worst relative RMS error of any
    /// tensor after loading (1-D tensors are F32 and must be exact).
    fn worst_error(arch: Architecture, ty: GgmlDType) -> f32 {
        let spec = if matches!(ty, GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K) {
            wide_spec(arch)
        } else {
            tiny_spec(arch)
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        write_gguf(&path, &spec, 11, ty).unwrap();
        let file = GgufSource::open(&path).unwrap();
        assert_eq!(file.spec, spec);
        let mut worst = 0f32;
        for (name, want) in random_weights(&spec, 11) {
            let got = file.source.tensor(&name).unwrap();
            assert_eq!(got.shape, want.shape, "{name}");
            let err = rel_rms(&got.data, &want.data);
            if want.shape.len() == 1 {
                assert_eq!(err, 0.0, "{name}");
            }
            worst = worst.max(err);
        }
        worst
    }

    #[test]
    fn gguf_round_trip_every_supported_type() {
        // Relative RMS error bounds: a few times the typical error of each format on
        // Gaussian weights.
        let cases = [
            (GgmlDType::F32, 0.0),
            (GgmlDType::F16, 1e-3),
            (GgmlDType::BF16, 5e-3),
            (GgmlDType::Q8_0, 0.01),
            (GgmlDType::Q5_0, 0.06),
            (GgmlDType::Q5_1, 0.05),
            (GgmlDType::Q4_0, 0.12),
            (GgmlDType::Q4_1, 0.1),
            (GgmlDType::Q6K, 0.03),
            (GgmlDType::Q5K, 0.05),
            (GgmlDType::Q4K, 0.1),
        ];
        for (ty, bound) in cases {
            for arch in [Architecture::Llama, Architecture::Qwen2] {
                let err = worst_error(arch, ty);
                eprintln!("{ty:?} {arch:?}: worst relative RMS error {err:.5}");
                assert!(err <= bound, "{ty:?} {arch:?}: error {err} > {bound}");
            }
        }
    }

    #[test]
    fn llama_qk_rows_are_unpermuted_exactly() {
        let spec = tiny_spec(Architecture::Llama);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        write_gguf(&path, &spec, 5, GgmlDType::F32).unwrap();
        let file = GgufSource::open(&path).unwrap();
        for (name, want) in random_weights(&spec, 5) {
            if name.contains("q_proj") || name.contains("k_proj") {
                let got = file.source.tensor(&name).unwrap();
                assert_eq!(got, want, "{name}");
                // The file really holds permuted rows, so the check above has teeth.
                let e = &file.source.entries[&name];
                let (s, end) = e.range.unwrap();
                let raw = gguf_header::dequantize(GgmlDType::F32, &file.source.mmap[s..end], 0);
                assert_ne!(raw, want.data, "{name}");
                assert_eq!(
                    raw,
                    permute_rows(&want.data, want.shape[0], e.permuted_heads.unwrap())
                );
            }
        }
    }

    #[test]
    fn unsupported_type_is_named_when_read() {
        let spec = tiny_spec(Architecture::Llama);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        // Q2_K needs 256-wide rows.
        let spec = ModelSpec {
            num_layers: 1,
            ..wide_spec(spec.architecture)
        };
        write_gguf(&path, &spec, 5, GgmlDType::Q2K).unwrap();
        let file = GgufSource::open(&path).unwrap();
        let err = file
            .source
            .tensor("model.layers.0.mlp.up_proj.weight")
            .unwrap_err();
        match err {
            Error::UnsupportedDtype { tensor, dtype, .. } => {
                assert_eq!(
                    tensor,
                    "model.layers.0.mlp.up_proj.weight (blk.0.ffn_up.weight)"
                );
                assert_eq!(dtype, "Q2_K");
            }
            other => panic!("unexpected {other}"),
        }
        // Norms are F32 and still readable.
        assert!(file.source.tensor("model.norm.weight").is_ok());
    }
}
