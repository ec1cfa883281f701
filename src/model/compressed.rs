//! compressed-tensors checkpoints (llm-compressor, ModelOpt exports, `fpx export`): linear
//! weights stored as FP8, NVFP4 or MXFP4 are decoded to FP32 on load, so every later stage
//! sees an ordinary `.weight`.
//!
//! `config.json`'s `quantization_config` must say `quant_method: "compressed-tensors"`, and
//! every config group's format must be one fpx reads: `float-quantized` / `naive-quantized`
//! (8-bit float weights, per channel or per tensor), `nvfp4-pack-quantized`,
//! `mxfp4-pack-quantized`, or `dense`. Any other quant method or format (GPTQ/AWQ int4
//! `pack-quantized`, block FP8, sparse 2:4, ...) is refused by name. Decoding follows
//! compressed-tensors' `decompress` in FP32:
//!
//! * FP8: `e4m3(weight) * weight_scale` (scale `[N, 1]`, `[N]` or `[1]`);
//! * NVFP4: `e2m1(weight_packed) * (e4m3(weight_scale) / weight_global_scale)` (the global
//!   scale is a divisor), blocks of 16, low nibble = even element;
//! * MXFP4: `e2m1(weight_packed) * 2^(weight_scale - 127)`, blocks of 32.
//!
//! A module's tensors say which it is (`weight_global_scale` marks NVFP4). Activation
//! quantization in the config is not applied on load: a plan applies activations.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use serde_json::Value;

use super::safetensors::{convert, SafetensorsSource};
use super::{Tensor, TensorHeader, WeightSource};
use crate::error::{Error, Result};
use crate::formats::{e2m1_decode, e4m3_decode, e8m0_decode};

/// Group formats this reader decodes.
const READ: &str = "float-quantized, naive-quantized, nvfp4-pack-quantized, mxfp4-pack-quantized";

/// How one module's weight is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stored {
    Fp8,
    Nvfp4,
    Mxfp4,
}

impl Stored {
    fn name(self) -> &'static str {
        match self {
            Stored::Fp8 => "compressed-tensors:fp8",
            Stored::Nvfp4 => "compressed-tensors:nvfp4",
            Stored::Mxfp4 => "compressed-tensors:mxfp4",
        }
    }
}

/// Safetensors weights, with compressed-tensors modules decoded to `.weight` on request.
pub struct CompressedSource {
    inner: SafetensorsSource,
    /// Module name (`model.layers.0.mlp.up_proj`) -> storage, for the quantized modules.
    modules: BTreeMap<String, Stored>,
}

/// Suffixes of the tensors a quantized module stores instead of `weight`.
const PARTS: [&str; 6] = [
    "weight_packed",
    "weight_scale",
    "weight_global_scale",
    "weight_zero_point",
    "input_global_scale",
    "input_scale",
];

impl CompressedSource {
    /// Wraps `inner`; with no `quantization_config` in `config_path`, a pass-through.
    pub fn open(config_path: &Path, inner: SafetensorsSource) -> Result<CompressedSource> {
        let text = std::fs::read_to_string(config_path).map_err(|e| Error::io(config_path, e))?;
        let config: Value = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: config_path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let mut source = CompressedSource {
            inner,
            modules: BTreeMap::new(),
        };
        let Some(qc) = config.get("quantization_config") else {
            return Ok(source);
        };
        check_config(config_path, qc)?;
        for name in source.inner.names() {
            let Some(module) = name.strip_suffix(".weight_scale") else {
                continue;
            };
            let stored = source.stored(config_path, module)?;
            source.modules.insert(module.to_string(), stored);
        }
        Ok(source)
    }

    /// What a module with a `weight_scale` stores, from its tensors.
    fn stored(&self, config_path: &Path, module: &str) -> Result<Stored> {
        let has = |s: &str| self.inner.contains(&format!("{module}.{s}"));
        let (scale_dtype, _, _, file) = self.inner.raw(&format!("{module}.weight_scale"))?;
        let refuse = |what: String| Error::Tensor {
            path: file.to_path_buf(),
            tensor: format!("{module}.weight_scale"),
            reason: format!(
                "{what} (fpx reads {READ}; config {})",
                config_path.display()
            ),
        };
        if has("weight_zero_point") {
            return Err(refuse("asymmetric quantization (a zero point)".into()));
        }
        if has("weight_packed") {
            let (packed, _, _, _) = self.inner.raw(&format!("{module}.weight_packed"))?;
            return match (packed, scale_dtype, has("weight_global_scale")) {
                (Dtype::U8, Dtype::F8_E4M3, true) => Ok(Stored::Nvfp4),
                (Dtype::U8, Dtype::U8 | Dtype::F8_E8M0, false) => Ok(Stored::Mxfp4),
                (p, s, g) => Err(refuse(format!(
                    "packed weights {p:?} with {s:?} scales{}: not NVFP4 or MXFP4",
                    if g { " and a global scale" } else { "" }
                ))),
            };
        }
        match self.inner.raw(&format!("{module}.weight")) {
            Ok((Dtype::F8_E4M3, _, _, _)) => Ok(Stored::Fp8),
            Ok((d, _, _, _)) => Err(refuse(format!("{d:?} weights with a weight_scale"))),
            Err(e) => Err(e),
        }
    }

    fn decode(&self, module: &str, stored: Stored) -> Result<Tensor> {
        let get = |s: &str| self.inner.raw(&format!("{module}.{s}"));
        let (_, scale_shape, scale, file) = get("weight_scale")?;
        let bad = |reason: String| Error::Tensor {
            path: file.to_path_buf(),
            tensor: format!("{module}.weight"),
            reason,
        };
        let (rows, cols, codes) = match stored {
            Stored::Fp8 => {
                let (_, shape, codes, _) = get("weight")?;
                (shape[0], shape.get(1).copied().unwrap_or(1), codes)
            }
            Stored::Nvfp4 | Stored::Mxfp4 => {
                let (_, shape, codes, _) = get("weight_packed")?;
                (shape[0], 2 * shape.get(1).copied().unwrap_or(0), codes)
            }
        };
        if shape_len(&[rows, cols]) != codes.len() * if stored == Stored::Fp8 { 1 } else { 2 } {
            return Err(bad("weight shape disagrees with its bytes".into()));
        }
        let mut data = vec![0f32; rows * cols];
        match stored {
            Stored::Fp8 => {
                let (dtype, _, _, _) = get("weight_scale")?;
                let s = convert(scale, dtype)
                    .ok_or_else(|| bad(format!("weight_scale of type {dtype:?}")))?;
                let per_row = match s.len() {
                    1 => false,
                    n if n == rows => true,
                    n => {
                        return Err(bad(format!(
                            "{n} scales for {rows} rows (per-channel or per-tensor only)"
                        )))
                    }
                };
                for (r, row) in data.chunks_mut(cols.max(1)).enumerate() {
                    let sc = s[if per_row { r } else { 0 }];
                    for (o, &c) in row.iter_mut().zip(&codes[r * cols..(r + 1) * cols]) {
                        *o = e4m3_decode(c) * sc;
                    }
                }
            }
            Stored::Nvfp4 | Stored::Mxfp4 => {
                let block = if stored == Stored::Nvfp4 { 16 } else { 32 };
                if cols % block != 0 || scale_shape != [rows, cols / block] {
                    return Err(bad(format!(
                        "weight_scale has shape {scale_shape:?}, expected [{rows}, {}]",
                        cols / block
                    )));
                }
                let divisor = if stored == Stored::Nvfp4 {
                    let (d, _, g, _) = get("weight_global_scale")?;
                    let g = convert(g, d).filter(|g| g.len() == 1).ok_or_else(|| {
                        bad(format!("weight_global_scale must be one float, got {d:?}"))
                    })?;
                    g[0]
                } else {
                    1.0
                };
                for (i, out) in data.iter_mut().enumerate() {
                    let byte = codes[i / 2];
                    let code = if i % 2 == 0 { byte & 0x0F } else { byte >> 4 };
                    let s = scale[i / block];
                    let eff = if stored == Stored::Nvfp4 {
                        e4m3_decode(s) / divisor
                    } else {
                        e8m0_decode(s)
                    };
                    *out = e2m1_decode(code) * eff;
                }
            }
        }
        Ok(Tensor {
            shape: vec![rows, cols],
            data,
        })
    }

    /// Header of a tensor as the rest of fpx sees it (decoded modules as FP32 `.weight`).
    pub(crate) fn header(&self, name: &str) -> Option<TensorHeader> {
        if let Some((module, stored)) = self.module_of(name) {
            let shape = self.shape(name).ok()?;
            let file = self.inner.header(&format!("{module}.weight_scale"))?.file;
            return Some(TensorHeader {
                file,
                dtype: stored.name().to_string(),
                shape,
                supported: true,
            });
        }
        self.inner.header(name)
    }

    fn module_of(&self, name: &str) -> Option<(&str, Stored)> {
        let module = name.strip_suffix(".weight")?;
        self.modules
            .get_key_value(module)
            .map(|(m, &s)| (m.as_str(), s))
    }
}

fn shape_len(s: &[usize]) -> usize {
    s.iter().product()
}

/// Refuses quant methods and group formats fpx does not decode, by name.
fn check_config(path: &Path, qc: &Value) -> Result<()> {
    let err = |reason: String| Error::Config {
        path: PathBuf::from(path),
        reason,
    };
    let method = qc.get("quant_method").and_then(Value::as_str).unwrap_or("");
    if method != "compressed-tensors" {
        return Err(err(format!(
            "quantization_config.quant_method `{method}` is not read by fpx (it reads \
             compressed-tensors checkpoints: {READ})"
        )));
    }
    let global = qc.get("format").and_then(Value::as_str);
    let groups = qc.get("config_groups").and_then(Value::as_object);
    for (name, g) in groups.into_iter().flatten() {
        let format = g
            .get("format")
            .and_then(Value::as_str)
            .or(global)
            .unwrap_or("");
        let ok = matches!(
            format,
            "float-quantized"
                | "naive-quantized"
                | "nvfp4-pack-quantized"
                | "mxfp4-pack-quantized"
                | "dense"
        );
        let w = &g["weights"];
        let block_fp8 = w["strategy"] == "block";
        if !ok || block_fp8 || (format != "dense" && w["type"] != "float") {
            let what = if block_fp8 {
                format!("{format} with block scales")
            } else {
                format.to_string()
            };
            return Err(err(format!(
                "compressed-tensors format `{what}` (config group `{name}`) is not read by fpx \
                 (it reads {READ})"
            )));
        }
    }
    Ok(())
}

impl WeightSource for CompressedSource {
    fn tensor(&self, name: &str) -> Result<Tensor> {
        match self.module_of(name) {
            Some((module, stored)) => self.decode(module, stored),
            None => self.inner.tensor(name),
        }
    }

    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        match self.module_of(name) {
            Some((module, Stored::Fp8)) => self.inner.shape(&format!("{module}.weight")),
            Some((module, _)) => {
                let s = self.inner.shape(&format!("{module}.weight_packed"))?;
                Ok(vec![s[0], 2 * s.get(1).copied().unwrap_or(0)])
            }
            None => self.inner.shape(name),
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.module_of(name).is_some() || self.inner.contains(name)
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .inner
            .names()
            .into_iter()
            .filter(|n| {
                let Some((module, part)) = n.rsplit_once('.') else {
                    return true;
                };
                !(self.modules.contains_key(module) && PARTS.contains(&part))
            })
            .collect();
        names.extend(self.modules.keys().map(|m| format!("{m}.weight")));
        names.sort();
        names.dedup();
        names
    }

    fn stored_dtype(&self, name: &str) -> Option<String> {
        match self.module_of(name) {
            Some(_) => None,
            None => self.inner.stored_dtype(name),
        }
    }
}
