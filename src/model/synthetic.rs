//! Tiny synthetic checkpoints for tests across the crate: random but deterministic weights
//! written as a Hugging Face directory ([`write_hf_checkpoint`]) or as a llama.cpp-style GGUF
//! ([`write_gguf`]), both with a small byte-level BPE tokenizer.
//!
//! The same `(spec, seed)` gives the same weights in both formats ([`random_weights`]), so
//! tests can compare the two loaders. The GGUF writer follows `convert_hf_to_gguf.py`: names
//! in llama.cpp's scheme, q/k rows permuted for llama, linear weights (embedding and lm_head
//! included) quantized with candle to the requested type, norms and biases F32. Weights have
//! a standard deviation of 0.02..0.1 and norms sit near 1, so a forward pass stays tame.
//! Mistral specs are written to GGUF as `llama`, as llama.cpp does; RoPE scaling as llama.cpp
//! writes it (llama3: a `rope_freqs` tensor; linear: `rope.scaling.*` metadata), a second EOS
//! id as the `eot` token.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
pub use candle_core::quantized::GgmlDType;
use candle_core::quantized::QTensor;
use safetensors::Dtype;

use super::config::HfConfig;
use super::gguf::{gguf_name, permute_rows};
use super::rope::RopeScaling;
use super::tokenizer::{bpe_tokenizer_json, byte_to_unicode, TOKEN_CONTROL, TOKEN_NORMAL};
use super::{expected_tensors, Architecture, EosIds, ModelSpec, Tensor};
use crate::error::{Error, Result};

/// Storage type of a synthetic Hugging Face checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HfDtype {
    F32,
    F16,
    BF16,
}

/// Merges of the synthetic vocabulary (byte-level alphabet, `Ġ` = space).
const MERGES: [(&str, &str); 20] = [
    ("Ġ", "t"),
    ("h", "e"),
    ("Ġt", "he"),
    ("i", "n"),
    ("Ġ", "a"),
    ("e", "r"),
    ("o", "n"),
    ("Ġ", "s"),
    ("r", "e"),
    ("a", "t"),
    ("e", "n"),
    ("Ġ", "o"),
    ("Ġ", "w"),
    ("n", "d"),
    ("Ġa", "nd"),
    ("i", "s"),
    ("o", "u"),
    ("Ġ", "c"),
    ("e", "s"),
    ("i", "t"),
];

/// The smallest vocabulary [`synthetic_vocab`] can build: one special token, 256 bytes and
/// the merges.
pub const MIN_SYNTHETIC_VOCAB: usize = 1 + 256 + MERGES.len();

/// A small spec: hidden 64, 2 layers, 4 heads / 2 KV heads of dim 16, FFN 128, vocab 300.
/// Qwen2 gets q/k/v biases and an untied lm_head; Llama and Mistral tie embeddings; Qwen3-MoE
/// and Mixtral get 4 experts, top-2: Qwen3-MoE's of 32 (`moe_intermediate_size`, layer 0
/// dense), Mixtral's of the FFN width, as its config has no width of its own for experts.
pub fn tiny_spec(arch: Architecture) -> ModelSpec {
    let moe = super::moe::MoeNames::of(arch).map(|_| super::moe::MoeSpec {
        experts: 4,
        top_k: 2,
        expert_ffn: if arch == Architecture::Mixtral {
            128
        } else {
            32
        },
        norm_top_k: true,
        dense_layers: if arch == Architecture::Qwen3Moe {
            vec![0]
        } else {
            Vec::new()
        },
    });
    ModelSpec {
        architecture: arch,
        hidden_size: 64,
        intermediate_size: 128,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        vocab_size: 300,
        rope_theta: 10_000.0,
        rope_scaling: Default::default(),
        rms_norm_eps: 1e-5,
        tie_word_embeddings: arch != Architecture::Qwen2,
        attention_bias: arch == Architecture::Qwen2,
        max_position_embeddings: 256,
        sliding_window: None,
        bos_token_id: Some(0),
        eos_token_id: EosIds::new([0]),
        moe,
    }
}

/// Tokens, llama.cpp token types and merges of a byte-level BPE vocabulary of exactly
/// `vocab_size` ids: `<|endoftext|>` (id 0, control), the 256 byte tokens, one token per
/// merge, then control padding tokens `<|pad_N|>`.
pub fn synthetic_vocab(vocab_size: usize) -> Result<(Vec<String>, Vec<i32>, Vec<String>)> {
    if vocab_size < MIN_SYNTHETIC_VOCAB {
        return Err(Error::invalid(
            "vocab_size",
            format!(
                "synthetic vocabularies need at least {MIN_SYNTHETIC_VOCAB} ids, got {vocab_size}"
            ),
        ));
    }
    let mut tokens = vec!["<|endoftext|>".to_string()];
    let mut types = vec![TOKEN_CONTROL];
    for c in byte_to_unicode() {
        tokens.push(c.to_string());
        types.push(TOKEN_NORMAL);
    }
    let mut merges = Vec::new();
    for (a, b) in MERGES {
        tokens.push(format!("{a}{b}"));
        types.push(TOKEN_NORMAL);
        merges.push(format!("{a} {b}"));
    }
    let mut pad = 0;
    while tokens.len() < vocab_size {
        tokens.push(format!("<|pad_{pad}|>"));
        types.push(TOKEN_CONTROL);
        pad += 1;
    }
    Ok((tokens, types, merges))
}

/// The `tokenizer.ggml.pre` (and matching tokenizer.json pre-tokenizer) used for an
/// architecture's synthetic checkpoints.
pub fn synthetic_pre(arch: Architecture) -> &'static str {
    match arch {
        Architecture::Qwen2 | Architecture::Qwen3 | Architecture::Qwen3Moe => "qwen2",
        Architecture::Llama | Architecture::Mistral | Architecture::Mixtral => "smollm",
    }
}

/// SplitMix64: tiny, deterministic, good enough for test weights.
struct SplitMix(u64);

impl SplitMix {
    /// The state's increment per draw.
    const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(Self::GAMMA);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in (0, 1].
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
    }
}

fn name_seed(seed: u64, name: &str) -> u64 {
    // FNV-1a over the name, mixed with the seed: each tensor's values depend only on
    // (seed, name), not on the order tensors are generated in.
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed.wrapping_mul(0x1000_0000_01b3);
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x1000_0000_01b3);
    }
    h
}

/// The weights of a synthetic checkpoint, in [`expected_tensors`] order (HF names and
/// layout). Same `(spec, seed)`, same weights.
pub fn random_weights(spec: &ModelSpec, seed: u64) -> Vec<(String, Tensor)> {
    expected_tensors(spec)
        .into_iter()
        .map(|(name, shape)| {
            let t = random_tensor(seed, &name, shape);
            (name, t)
        })
        .collect()
}

/// Elements generated per rayon task by [`random_tensor`].
const CHUNK: usize = 1 << 20;

/// One tensor of [`random_weights`]: its values depend on `(seed, name, shape)` only.
/// Generated in parallel chunks: SplitMix64's state after `i` draws is the seed plus `i`
/// times its increment, so each chunk starts its own generator where the sequential one
/// would be (two draws per value) and the values are those of one sequential pass.
fn random_tensor(seed: u64, name: &str, shape: Vec<usize>) -> Tensor {
    use rayon::prelude::*;
    let n: usize = shape.iter().product();
    let (mean, std) = if name.ends_with("norm.weight") {
        (1.0, 0.1)
    } else if name.ends_with(".bias") {
        (0.0, 0.02)
    } else {
        let fan_in = *shape.last().unwrap_or(&1) as f32;
        (0.0, (0.5 / fan_in.sqrt()).clamp(0.02, 0.1))
    };
    let start = name_seed(seed, name);
    let mut data = vec![0.0f32; n];
    data.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let draws = 2 * (c * CHUNK) as u64;
            let mut rng = SplitMix(start.wrapping_add(draws.wrapping_mul(SplitMix::GAMMA)));
            chunk
                .iter_mut()
                .for_each(|v| *v = mean + std * rng.normal());
        });
    Tensor { shape, data }
}

/// A tensor of a synthetic checkpoint that is generated when the safetensors writer asks for
/// its bytes, so writing a checkpoint holds one tensor at a time (a model of billions of
/// parameters is written in the memory of its largest tensor).
struct LazyTensor {
    seed: u64,
    name: String,
    shape: Vec<usize>,
    dtype: HfDtype,
}

impl safetensors::View for LazyTensor {
    fn dtype(&self) -> Dtype {
        self.dtype.safetensors()
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        let t = random_tensor(self.seed, &self.name, self.shape.clone());
        self.dtype.encode(&t.data).into()
    }

    fn data_len(&self) -> usize {
        self.dtype.width() * self.shape.iter().product::<usize>()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::io(path, e)
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON values serialize");
    std::fs::write(path, text).map_err(io(path))
}

impl HfDtype {
    fn safetensors(self) -> Dtype {
        match self {
            HfDtype::F32 => Dtype::F32,
            HfDtype::F16 => Dtype::F16,
            HfDtype::BF16 => Dtype::BF16,
        }
    }

    /// The `torch_dtype` config.json names it by.
    fn torch_name(self) -> &'static str {
        match self {
            HfDtype::F32 => "float32",
            HfDtype::F16 => "float16",
            HfDtype::BF16 => "bfloat16",
        }
    }

    /// Bytes per element.
    fn width(self) -> usize {
        match self {
            HfDtype::F32 => 4,
            HfDtype::F16 | HfDtype::BF16 => 2,
        }
    }

    /// Little-endian bytes of `data` in this type (rounded to nearest even).
    fn encode(self, data: &[f32]) -> Vec<u8> {
        match self {
            HfDtype::F32 => data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            HfDtype::F16 => data
                .iter()
                .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                .collect(),
            HfDtype::BF16 => data
                .iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                .collect(),
        }
    }
}

/// Write a Hugging Face checkpoint of `spec` into `dir` (created if needed): `config.json`,
/// `tokenizer.json`, and the weights in `shards` safetensors files (with
/// `model.safetensors.index.json` when `shards > 1`).
pub fn write_hf_checkpoint(
    dir: &Path,
    spec: &ModelSpec,
    seed: u64,
    dtype: HfDtype,
    shards: usize,
) -> Result<()> {
    let tensors = expected_tensors(spec);
    if shards == 0 || shards > tensors.len() {
        return Err(Error::invalid(
            "shards",
            format!("need 1..={} shards, got {shards}", tensors.len()),
        ));
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;

    let mut config = serde_json::to_value(HfConfig::from(spec)).expect("config serializes");
    config["torch_dtype"] = dtype.torch_name().into();
    write_json(&dir.join("config.json"), &config)?;

    let (tokens, types, merges) = synthetic_vocab(spec.vocab_size)?;
    let tok = bpe_tokenizer_json(&tokens, &types, &merges, synthetic_pre(spec.architecture));
    write_json(&dir.join("tokenizer.json"), &tok)?;

    let per_shard = tensors.len().div_ceil(shards);
    let mut weight_map = serde_json::Map::new();
    let mut total = 0usize;
    for (i, chunk) in tensors.chunks(per_shard).enumerate() {
        let file = if shards == 1 {
            super::safetensors::SINGLE_FILE.to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, shards)
        };
        let path = dir.join(&file);
        let views: Vec<(String, LazyTensor)> = chunk
            .iter()
            .map(|(name, shape)| {
                let view = LazyTensor {
                    seed,
                    name: name.clone(),
                    shape: shape.clone(),
                    dtype,
                };
                weight_map.insert(name.clone(), file.clone().into());
                total += safetensors::View::data_len(&view);
                (name.clone(), view)
            })
            .collect();
        safetensors::serialize_to_file(views, None, &path).map_err(|e| Error::File {
            path: path.clone(),
            what: "safetensors",
            reason: e.to_string(),
        })?;
    }
    if shards > 1 {
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_json(&dir.join(super::safetensors::INDEX_FILE), &index)?;
    }
    Ok(())
}

fn candle_err(path: &Path, what: &str) -> impl FnOnce(candle_core::Error) -> Error {
    let path = path.to_path_buf();
    let what = what.to_string();
    move |e| Error::Tensor {
        path,
        tensor: what,
        reason: e.to_string(),
    }
}

/// Write a GGUF of `spec` to `path` the way llama.cpp's converter would (see the module
/// docs). `linear_type` must divide the input dimension of every linear weight into whole
/// blocks (32 for Q4_0..Q8_0, 256 for K-quants).
pub fn write_gguf(path: &Path, spec: &ModelSpec, seed: u64, linear_type: GgmlDType) -> Result<()> {
    let arch = match spec.architecture {
        Architecture::Llama | Architecture::Mistral => "llama",
        Architecture::Qwen2 => "qwen2",
        Architecture::Qwen3 => "qwen3",
        Architecture::Qwen3Moe | Architecture::Mixtral => return Err(Error::invalid(
            "synthetic gguf",
            "this synthetic writer does not stack experts; scripts/gguf_tiny.py writes MoE GGUFs \
                 as llama.cpp's converter does",
        )),
    };
    let refuse = |reason: &str| Err(Error::invalid("synthetic gguf", reason.to_string()));
    if spec.sliding_window.is_some() {
        return refuse("llama.cpp's llama, qwen2 and qwen3 have no sliding-window attention");
    }
    let eos = spec.eos_token_id.ids();
    if eos.len() > 2 {
        return refuse("GGUF names at most two end ids here (eos, eot)");
    }
    let (tokens, types, merges) = synthetic_vocab(spec.vocab_size)?;
    let u32v = |v: usize| Value::U32(v as u32);
    let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.name".into(), Value::String("fpx synthetic".into())),
        (format!("{arch}.block_count"), u32v(spec.num_layers)),
        (
            format!("{arch}.context_length"),
            u32v(spec.max_position_embeddings),
        ),
        (format!("{arch}.embedding_length"), u32v(spec.hidden_size)),
        (
            format!("{arch}.feed_forward_length"),
            u32v(spec.intermediate_size),
        ),
        (format!("{arch}.attention.head_count"), u32v(spec.num_heads)),
        (
            format!("{arch}.attention.head_count_kv"),
            u32v(spec.num_kv_heads),
        ),
        (format!("{arch}.attention.key_length"), u32v(spec.head_dim)),
        (
            format!("{arch}.attention.value_length"),
            u32v(spec.head_dim),
        ),
        (format!("{arch}.rope.dimension_count"), u32v(spec.head_dim)),
        (
            format!("{arch}.rope.freq_base"),
            Value::F32(spec.rope_theta),
        ),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(spec.rms_norm_eps),
        ),
        (format!("{arch}.vocab_size"), u32v(spec.vocab_size)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        (
            "tokenizer.ggml.pre".into(),
            Value::String(synthetic_pre(spec.architecture).into()),
        ),
        ("tokenizer.ggml.tokens".into(), strings(tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges".into(), strings(merges)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
    ];
    for (key, id) in [
        ("tokenizer.ggml.bos_token_id", spec.bos_token_id),
        ("tokenizer.ggml.eos_token_id", eos.first().copied()),
        ("tokenizer.ggml.eot_token_id", eos.get(1).copied()),
    ] {
        if let Some(id) = id {
            meta.push((key.into(), Value::U32(id)));
        }
    }
    let mut extra: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    match &spec.rope_scaling {
        RopeScaling::Default => {}
        RopeScaling::Linear { factor } => {
            meta.push((
                format!("{arch}.rope.scaling.type"),
                Value::String("linear".into()),
            ));
            meta.push((format!("{arch}.rope.scaling.factor"), Value::F32(*factor)));
        }
        scaling => {
            let factors = match scaling {
                RopeScaling::Factors { factors } => factors.clone(),
                s => s
                    .llama_cpp_factors(spec.rope_theta, spec.head_dim)
                    .expect("llama3 has factors"),
            };
            let shape = vec![factors.len()];
            extra.push((super::gguf::ROPE_FREQS.into(), shape, factors));
        }
    }

    let permute = arch == "llama";
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for (ct, shape, data) in extra {
        let t = candle_core::Tensor::from_vec(data, shape.as_slice(), &candle_core::Device::Cpu)
            .map_err(candle_err(path, &ct))?;
        let q = QTensor::quantize(&t, GgmlDType::F32).map_err(candle_err(path, &ct))?;
        tensors.push((ct, q));
    }
    for (name, t) in random_weights(spec, seed) {
        let gname = gguf_name(&name).expect("expected tensors all have llama.cpp names");
        let mut data = t.data;
        if permute && (name.contains(".q_proj.") || name.contains(".k_proj.")) {
            let heads = if name.contains(".q_proj.") {
                spec.num_heads
            } else {
                spec.num_kv_heads
            };
            data = permute_rows(&data, t.shape[0], heads);
        }
        let dtype = if t.shape.len() == 2 {
            linear_type
        } else {
            GgmlDType::F32
        };
        let block = dtype.block_size();
        if t.shape[t.shape.len() - 1] % block != 0 {
            return Err(Error::invalid(
                "gguf linear type",
                format!(
                    "{name} has rows of {} values, not a multiple of the {dtype:?} block ({block})",
                    t.shape[t.shape.len() - 1]
                ),
            ));
        }
        let ct = candle_core::Tensor::from_vec(data, t.shape.as_slice(), &candle_core::Device::Cpu)
            .map_err(candle_err(path, &name))?;
        let q = QTensor::quantize(&ct, dtype).map_err(candle_err(path, &name))?;
        tensors.push((gname, q));
    }

    let file = File::create(path).map_err(io(path))?;
    let mut w = BufWriter::new(file);
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut w, &meta_refs, &tensor_refs).map_err(|e| Error::File {
        path: path.to_path_buf(),
        what: "gguf",
        reason: e.to_string(),
    })?;
    std::io::Write::flush(&mut w).map_err(io(path))
}
