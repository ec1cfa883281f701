//! `fpx export`: a plan's model as a Hugging Face directory in the compressed-tensors format,
//! which vLLM, SGLang and transformers load as it is.
//!
//! Every quantized linear is fpx's own [`Format::quantize`] output re-laid (codes and scale
//! bytes copied, never re-quantized; the NVFP4 tensor scale is stored as its reciprocal, the
//! divisor compressed-tensors expects), with the plan's MXFP4 scale rule. Everything else
//! (embeddings, norms, biases, linears the plan leaves in 16 bits) is written in the export
//! dtype. [`scheme`] maps formats to compressed-tensors schemes, [`shards`] streams the
//! safetensors shards, [`hf_files`] writes config, tokenizer and index. The directory is
//! built in a temporary sibling and renamed into place at the end, so a failed or
//! interrupted export leaves nothing that looks complete.

pub mod hf_files;
pub mod scheme;
pub mod shards;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::formats::{Format, MxScaleRule, QuantizedMatrix, Scales};
use crate::ir::{Graph, LinearKind};
use crate::lower::fused::{nvfp4_tensor_amax, Fused};
use crate::model::{expected_tensors, Model};
use crate::plan::Plan;

pub use scheme::Scheme;
use shards::{Part, Unit};

/// Hugging Face's default shard limit (5 GB).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// The dtype of every tensor the plan does not quantize.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportDtype {
    Bf16,
    Fp16,
    /// For exact checks: no 16-bit rounding of the unquantized tensors.
    Fp32,
}

impl ExportDtype {
    /// The name `config.json` uses (`torch_dtype`).
    pub fn torch_name(self) -> &'static str {
        match self {
            ExportDtype::Bf16 => "bfloat16",
            ExportDtype::Fp16 => "float16",
            ExportDtype::Fp32 => "float32",
        }
    }

    fn dtype(self) -> Dtype {
        match self {
            ExportDtype::Bf16 => Dtype::BF16,
            ExportDtype::Fp16 => Dtype::F16,
            ExportDtype::Fp32 => Dtype::F32,
        }
    }

    /// Little-endian bytes of `x` in this dtype (round to nearest even).
    fn encode(self, x: &[f32]) -> Vec<u8> {
        match self {
            ExportDtype::Bf16 => x
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                .collect(),
            ExportDtype::Fp16 => x
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect(),
            ExportDtype::Fp32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }
}

impl std::str::FromStr for ExportDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "bf16" | "bfloat16" => Ok(ExportDtype::Bf16),
            "fp16" | "f16" | "float16" => Ok(ExportDtype::Fp16),
            "fp32" | "f32" | "float32" => Ok(ExportDtype::Fp32),
            _ => Err(Error::invalid(
                "--dtype",
                format!("`{s}` (expected bf16, fp16 or fp32)"),
            )),
        }
    }
}

/// Settings of an export.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub dtype: ExportDtype,
    /// Replace an existing non-empty output directory.
    pub force: bool,
    pub max_shard_bytes: u64,
}

/// What an export wrote.
#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    pub dir: PathBuf,
    pub dtype: ExportDtype,
    pub mx_scale_rule: MxScaleRule,
    pub shards: usize,
    pub tensors: usize,
    /// Bytes of tensor data over all shards.
    pub tensor_bytes: u64,
    /// Layers per compressed-tensors group format (`float-quantized`, ...).
    pub layers_per_format: BTreeMap<String, usize>,
    /// Linears left in the export dtype (`ignore`), MoE routers included.
    pub ignored: Vec<String>,
    /// The memory bound of the stream: the largest source tensor in FP32 plus its output.
    pub peak_tensor_bytes: u64,
}

/// Where a unit's bytes come from.
enum Source {
    /// A tensor written in the export dtype; `f16` rounds it through IEEE half first (a
    /// linear the plan puts in fp16, as fpx evaluates it).
    Dense { tensor: String, f16: bool },
    /// A linear weight quantized to a format.
    Quantized {
        tensor: String,
        format: Format,
        rows: usize,
        cols: usize,
        /// The NVFP4 tensor amax of its fused group ([`crate::lower::fused`]), if shared.
        tensor_amax: Option<f32>,
    },
}

/// Exports `model` under `plan` (read from `plan_path`) to `out`.
///
/// Quantizes with the plan's MXFP4 scale rule (sets it for this process:
/// [`Plan::use_mx_scale_rule`]).
pub fn export(
    model: &Model,
    plan: &Plan,
    plan_path: &Path,
    out: &Path,
    opts: &ExportOptions,
) -> Result<ExportReport> {
    plan.check_model(plan_path, &model.identity)?;
    let graph = Graph::build(&model.spec);
    // Layer -> (weights, activations); layers the plan leaves out stay in 16 bits.
    let precision: Precision = plan
        .layers
        .iter()
        .map(|l| (l.name.clone(), (l.format, l.activations)))
        .collect();
    let linears: BTreeMap<String, (LinearKind, Option<usize>)> = graph
        .linears()
        .map(|(id, l)| {
            let n = graph.node(id);
            (n.name.clone(), (l.kind, n.layer))
        })
        .collect();
    if let Some(l) = plan.layers.iter().find(|l| !linears.contains_key(&l.name)) {
        return Err(Error::File {
            path: plan_path.to_path_buf(),
            what: "plan",
            reason: format!(
                "layer `{}` is not a linear layer of {}: a plan for another model",
                l.name,
                model.path.display()
            ),
        });
    }
    check_fused(&graph, &precision)?;
    plan.use_mx_scale_rule();

    let mut groups: BTreeMap<Scheme, Vec<String>> = BTreeMap::new();
    let mut ignored = Vec::new();
    let mut quantized: BTreeMap<String, Format> = BTreeMap::new();
    for (id, l) in graph.linears() {
        let name = &graph.node(id).name;
        let (weights, activations) = key(precision.get(name));
        let scheme = Scheme::new(name, weights, activations)?;
        if weights == Format::Fp16 {
            ignored.push(name.clone());
            continue;
        }
        if let Some(b) = weights.block_size().filter(|b| l.in_features % b != 0) {
            return Err(Error::Layer {
                layer: name.clone(),
                reason: format!(
                    "{weights} needs in_features ({}) to be a multiple of {b}: \
                     compressed-tensors stores whole blocks",
                    l.in_features
                ),
            });
        }
        groups.entry(scheme).or_default().push(name.clone());
        quantized.insert(name.clone(), weights);
    }
    // Routers stay in the export dtype (fpx computes them in FP32, as the engines do); named
    // in `ignore` as llm-compressor's MoE recipes name them, so no loader quantizes them.
    ignored.extend(graph.routers().map(|id| graph.node(id).name.clone()));
    add_vllm_expert_aliases(&graph, &model.spec, &mut groups, &mut ignored);

    let spec = &model.spec;
    let shared_amax = nvfp4_tensor_amax(&graph, model.weights.as_ref(), &|n| {
        quantized.get(n).copied()
    })?;
    // A tied lm_head gets a tensor of its own when the plan stores it otherwise than the
    // embedding table is exported: quantized, or rounded through fp16 in a wider dtype.
    let lm_head_format = precision.get("lm_head").map(|p| p.0);
    let lm_head_own = match lm_head_format {
        None => false,
        Some(Format::Fp16) => opts.dtype != ExportDtype::Fp16,
        Some(_) => true,
    };
    let tied = spec.tie_word_embeddings && !lm_head_own;
    let mut sources = Vec::new();
    let mut expected = expected_tensors(spec);
    if spec.tie_word_embeddings && lm_head_own {
        expected.push((
            "lm_head.weight".into(),
            vec![spec.vocab_size, spec.hidden_size],
        ));
    }
    for (name, shape) in expected {
        let layer = name.strip_suffix(".weight").unwrap_or(&name);
        match quantized.get(layer) {
            Some(&format) => {
                let tensor = if layer == "lm_head" && spec.tie_word_embeddings {
                    "model.embed_tokens.weight".to_string()
                } else {
                    name.clone()
                };
                let (rows, cols) = (shape[0], shape[1]);
                sources.push((
                    quantized_unit(layer, format, rows, cols),
                    Source::Quantized {
                        tensor,
                        format,
                        rows,
                        cols,
                        tensor_amax: shared_amax.get(layer).copied(),
                    },
                ));
            }
            None => {
                let part = Part {
                    name: name.clone(),
                    dtype: opts.dtype.dtype(),
                    shape,
                };
                let f16 = precision.get(layer).is_some_and(|p| p.0 == Format::Fp16);
                let tensor = if layer == "lm_head" && spec.tie_word_embeddings {
                    "model.embed_tokens.weight".to_string()
                } else {
                    name
                };
                let source = Source::Dense { tensor, f16 };
                sources.push((Unit { parts: vec![part] }, source));
            }
        }
    }
    let peak_tensor_bytes = sources
        .iter()
        .map(|(u, _)| {
            let elems: usize = u.parts[0].shape.iter().product();
            let fp4 = matches!(u.parts[0].dtype, Dtype::U8) && u.parts.len() > 1;
            let elems = if fp4 { 2 * elems } else { elems };
            4 * elems as u64 + u.parts.iter().map(|p| p.byte_len() as u64).sum::<u64>()
        })
        .max()
        .unwrap_or(0);

    let staging = Staging::new(out, opts.force)?;
    let units: Vec<Unit> = sources.iter().map(|(u, _)| u.clone()).collect();
    let (weight_map, tensor_bytes) =
        shards::write_shards(staging.path(), &units, opts.max_shard_bytes, |i| {
            produce(model, &sources[i].1, opts.dtype)
        })?;
    let quantization = if groups.is_empty() {
        serde_json::Value::Null
    } else {
        scheme::quantization_config(&groups, &ignored)
    };
    hf_files::write_config(model, staging.path(), opts.dtype, tied, quantization)?;
    hf_files::write_tokenizer_and_generation(model, staging.path())?;
    hf_files::write_index(staging.path(), &weight_map, tensor_bytes)?;
    let shard_count = weight_map
        .values()
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    staging.finish()?;

    let mut layers_per_format = BTreeMap::new();
    for (s, names) in &groups {
        *layers_per_format
            .entry(s.ct_format().to_string())
            .or_insert(0) += names.iter().filter(|n| quantized.contains_key(*n)).count();
    }
    Ok(ExportReport {
        dir: out.to_path_buf(),
        dtype: opts.dtype,
        mx_scale_rule: plan.mx_scale_rule(),
        shards: shard_count,
        tensors: weight_map.len(),
        tensor_bytes,
        layers_per_format,
        ignored,
        peak_tensor_bytes,
    })
}

/// A layer's (weight format, activation format).
type LayerPrecision = (Format, Option<Format>);
type Precision = BTreeMap<String, LayerPrecision>;

/// The precision of a layer the plan may leave out (16 bits).
fn key(p: Option<&LayerPrecision>) -> LayerPrecision {
    p.copied().unwrap_or((Format::Fp16, None))
}

/// What the engines fuse in a [`Fused`] group, and how to plan for it.
fn describe(fused: Fused) -> (&'static str, &'static str) {
    match fused {
        Fused::Qkv => (
            "q/k/v into one layer",
            "`fpx plan --target vllm` (or `--group qkv`)",
        ),
        Fused::GateUp => (
            "gate/up into one layer",
            "`fpx plan --target vllm` (or `--group gate_up`)",
        ),
        Fused::Experts => (
            "a block's experts into one MoE layer",
            "`fpx plan` without `--per-expert-formats`",
        ),
    }
}

/// Layers an engine fuses ([`Fused`]) must share weights and activations.
fn check_fused(graph: &Graph, precision: &Precision) -> Result<()> {
    let mut by_block: BTreeMap<(usize, Fused), Vec<(&str, LayerPrecision)>> = BTreeMap::new();
    for (id, l) in graph.linears() {
        let n = graph.node(id);
        if let (Some(b), Some(fused)) = (n.layer, Fused::of(l)) {
            by_block
                .entry((b, fused))
                .or_default()
                .push((n.name.as_str(), key(precision.get(&n.name))));
        }
    }
    for ((_, fused), members) in by_block {
        let first = members[0].1;
        if members.iter().any(|(_, p)| *p != first) {
            let show = |&(n, (w, a)): &(&str, LayerPrecision)| match a {
                Some(a) => format!("{n} = {w} (activations {a})"),
                None => format!("{n} = {w}"),
            };
            let names: Vec<String> = members
                .iter()
                .filter(|(_, p)| *p != first)
                .take(4)
                .map(show)
                .collect();
            let (what, how) = describe(fused);
            let first = show(&members[0]);
            return Err(Error::Layer {
                layer: members[0].0.to_string(),
                reason: format!(
                    "vLLM and SGLang fuse {what}, which needs one scheme, but the plan has \
                     {first} and {}; plan with {how}",
                    names.join(", "),
                ),
            });
        }
    }
    Ok(())
}

/// vLLM finds a fused MoE layer's scheme under `experts.0.gate_proj`, `up_proj` and `down_proj`
/// whatever the checkpoint calls its experts (`CompressedTensorsMoEMethod.get_moe_method`).
/// Mixtral's are `w1`/`w3`/`w2`, so exact-name targets would match nothing there: those three
/// names join the targets (or `ignore`) of the scheme the block's experts share. They name no
/// tensor; compressed-tensors' loaders skip targets that match no module.
fn add_vllm_expert_aliases(
    graph: &Graph,
    spec: &crate::model::ModelSpec,
    groups: &mut BTreeMap<Scheme, Vec<String>>,
    ignored: &mut Vec<String>,
) {
    let Some(names) = crate::model::moe::MoeNames::of(spec.architecture) else {
        return;
    };
    if names.gate == "gate_proj" {
        return;
    }
    for id in graph.routers() {
        let Some(layer) = graph.node(id).layer else {
            continue;
        };
        let first = &names.expert(layer, 0)[0];
        let aliases = ["gate_proj", "up_proj", "down_proj"]
            .map(|p| format!("model.layers.{layer}.{}.experts.0.{p}", names.block));
        match groups.values_mut().find(|t| t.contains(first)) {
            Some(targets) => targets.extend(aliases),
            None => ignored.extend(aliases),
        }
    }
}

/// The parts of a quantized linear `layer` ([N, K] = `rows` x `cols`).
fn quantized_unit(layer: &str, format: Format, rows: usize, cols: usize) -> Unit {
    let part = |suffix: &str, dtype, shape: Vec<usize>| Part {
        name: format!("{layer}.{suffix}"),
        dtype,
        shape,
    };
    let parts = match format {
        Format::Fp8 => vec![
            part("weight", Dtype::F8_E4M3, vec![rows, cols]),
            part("weight_scale", Dtype::F32, vec![rows, 1]),
        ],
        Format::Nvfp4 => vec![
            part("weight_packed", Dtype::U8, vec![rows, cols / 2]),
            part("weight_scale", Dtype::F8_E4M3, vec![rows, cols / 16]),
            part("weight_global_scale", Dtype::F32, vec![1]),
        ],
        Format::Mxfp4 => vec![
            part("weight_packed", Dtype::U8, vec![rows, cols / 2]),
            part("weight_scale", Dtype::U8, vec![rows, cols / 32]),
        ],
        Format::Fp16 => unreachable!("16-bit linears are dense units"),
    };
    Unit { parts }
}

/// The bytes of one unit: fpx's quantized matrix re-laid, or a tensor in the export dtype.
fn produce(model: &Model, source: &Source, dtype: ExportDtype) -> Result<Vec<Vec<u8>>> {
    match source {
        Source::Dense { tensor, f16 } => {
            let mut data = model.weights.tensor(tensor)?.data;
            if *f16 {
                let n = data.len();
                data = Format::Fp16.fake_quantize_weights(&data, 1, n);
            }
            Ok(vec![dtype.encode(&data)])
        }
        Source::Quantized {
            tensor,
            format,
            rows,
            cols,
            tensor_amax,
        } => {
            let w = model.weights.tensor(tensor)?;
            Ok(relay(format.quantize_against(
                &w.data,
                *rows,
                *cols,
                *tensor_amax,
            )))
        }
    }
}

/// compressed-tensors' tensors of a quantized matrix (whole blocks: rows are not padded).
pub fn relay(q: QuantizedMatrix) -> Vec<Vec<u8>> {
    match q.scales {
        Scales::Row(s) => vec![q.codes, s.iter().flat_map(|v| v.to_le_bytes()).collect()],
        Scales::Nvfp4 { block, global } => {
            // compressed-tensors divides by its global scale; a zero tensor has zero block
            // scales, so any divisor decodes it (1.0, as its own gparam fallback).
            let divisor = if global > 0.0 { 1.0 / global } else { 1.0 };
            vec![q.codes, block, divisor.to_le_bytes().to_vec()]
        }
        Scales::Mxfp4 { block } => vec![q.codes, block],
        Scales::None => vec![q.codes],
    }
}

/// The output directory under construction: a temporary sibling, renamed at the end.
struct Staging {
    tmp: tempfile::TempDir,
    out: PathBuf,
}

impl Staging {
    fn new(out: &Path, force: bool) -> Result<Staging> {
        if out.exists() {
            let non_empty = match std::fs::read_dir(out) {
                Ok(mut it) => it.next().is_some(),
                Err(_) => true,
            };
            if !out.is_dir() || (non_empty && !force) {
                return Err(Error::File {
                    path: out.to_path_buf(),
                    what: "export",
                    reason: "exists and is not an empty directory (pass --force to replace it)"
                        .into(),
                });
            }
        }
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        let name = out
            .file_name()
            .map_or_else(|| "export".into(), |n| n.to_string_lossy().into_owned());
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}.partial-"))
            .tempdir_in(&parent)
            .map_err(|e| Error::io(&parent, e))?;
        Ok(Staging {
            tmp,
            out: out.to_path_buf(),
        })
    }

    fn path(&self) -> &Path {
        self.tmp.path()
    }

    /// Moves the finished directory into place (replacing an old one under --force).
    fn finish(self) -> Result<()> {
        if self.out.exists() {
            std::fs::remove_dir_all(&self.out).map_err(|e| Error::io(&self.out, e))?;
        }
        let tmp = self.tmp.keep();
        std::fs::rename(&tmp, &self.out).map_err(|e| Error::io(&self.out, e))
    }
}
