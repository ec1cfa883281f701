//! RoPE scaling as GGUF files state it: `{arch}.rope.scaling.type = linear` with its factor,
//! or llama3's as llama.cpp's converter writes it, a `rope_freqs.weight` tensor of one factor
//! per rotated pair that each frequency is divided by (read for `llama` only, as llama.cpp
//! does). Other scaling types are refused by name.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;

use super::gguf::config_err;
use super::gguf_header;
use super::rope::RopeScaling;
use crate::error::{Error, Result};

/// llama.cpp's tensor of RoPE frequency factors (llama3 scaling).
pub const ROPE_FREQS: &str = "rope_freqs.weight";

/// Reads the `rope_freqs` tensor's values, when the file has one.
pub(super) type ReadFactors<'a> = Option<&'a dyn Fn() -> Result<Vec<f32>>>;

/// The RoPE scaling the file declares: none, `linear` with `rope.scaling.factor`, or (llama
/// only, as llama.cpp reads it) the factors of a `rope_freqs` tensor. Other types are refused
/// by name.
pub(super) fn rope_scaling(
    path: &Path,
    meta: &HashMap<String, Value>,
    arch: &str,
    rope_freqs: ReadFactors<'_>,
    opt_f64: &dyn Fn(&str) -> Result<Option<f64>>,
) -> Result<RopeScaling> {
    let key = format!("{arch}.rope.scaling.type");
    let declared = match meta.get(&key) {
        None => None,
        Some(Value::String(s)) if s == "none" => None,
        Some(Value::String(s)) if s == "linear" => Some(s.as_str()),
        Some(v) => {
            return Err(config_err(
                path,
                format!("{key} = {v:?} is not supported (fpx implements none and linear)"),
            ))
        }
    };
    match (declared, rope_freqs) {
        (Some(_), Some(_)) => Err(config_err(
            path,
            format!("{key} = linear together with a {ROPE_FREQS} tensor is not supported"),
        )),
        (Some(_), None) => {
            let factor_key = "rope.scaling.factor";
            let factor = opt_f64(factor_key)?.ok_or_else(|| {
                config_err(path, format!("{key} = linear needs {arch}.{factor_key}"))
            })?;
            let scaling = RopeScaling::Linear {
                factor: factor as f32,
            };
            scaling.validate().map_err(|r| config_err(path, r))?;
            Ok(scaling)
        }
        (None, Some(_)) if arch != "llama" => Err(config_err(
            path,
            format!(
                "tensor {ROPE_FREQS} (RoPE frequency factors) in a {arch} GGUF is not \
                 supported (llama.cpp reads it for llama only)"
            ),
        )),
        (None, Some(read)) => {
            let scaling = RopeScaling::Factors { factors: read()? };
            scaling.validate().map_err(|reason| Error::Tensor {
                path: path.to_path_buf(),
                tensor: ROPE_FREQS.into(),
                reason,
            })?;
            Ok(scaling)
        }
        (None, None) => Ok(RopeScaling::Default),
    }
}

/// The values of a one-dimensional tensor straight from the header and the bytes (the
/// `rope_freqs` factors, needed for the spec before the tensor table is mapped).
pub(super) fn read_vector(
    path: &Path,
    bytes: &[u8],
    data_offset: usize,
    t: &gguf_header::RawTensorInfo,
) -> Result<Vec<f32>> {
    let bad = |reason: String| Error::Tensor {
        path: path.to_path_buf(),
        tensor: t.name.clone(),
        reason,
    };
    let dtype = gguf_header::supported_type(t.ggml_type).ok_or_else(|| {
        bad(format!(
            "type {} is not supported",
            gguf_header::type_name(t.ggml_type)
        ))
    })?;
    let [n] = t.dims[..] else {
        return Err(bad(format!("has dims {:?}; expected one", t.dims)));
    };
    let size = gguf_header::byte_size(dtype, n).map_err(bad)?;
    let range = data_offset
        .checked_add(t.offset)
        .and_then(|s| Some((s, s.checked_add(size)?)))
        .filter(|&(_, e)| e <= bytes.len())
        .ok_or_else(|| bad("its bytes lie beyond the end of the file".into()))?;
    let data = gguf_header::dequantize(dtype, &bytes[range.0..range.1], n);
    super::check_finite(path, &t.name, &data)?;
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_scaling_other_than_llama_factors_and_linear_is_refused_by_name() {
        let meta = |arch: &str, scaling: Option<&str>| {
            let mut m = HashMap::from([(
                "general.architecture".to_string(),
                Value::String(arch.into()),
            )]);
            if let Some(t) = scaling {
                m.insert(format!("{arch}.rope.scaling.type"), Value::String(t.into()));
            }
            m
        };
        let read = || Ok(vec![1.0; 8]);
        let freqs: ReadFactors<'_> = Some(&read);
        let path = Path::new("m.gguf");
        for (m, factors, want) in [
            (meta("qwen2", None), freqs, "rope_freqs.weight"),
            (meta("llama", Some("yarn")), None, "rope.scaling.type"),
            (meta("llama", Some("linear")), freqs, "together"),
            (meta("llama", Some("linear")), None, "rope.scaling.factor"),
        ] {
            let arch = match m.get("general.architecture") {
                Some(Value::String(a)) => a.clone(),
                _ => unreachable!(),
            };
            let opt_f64 = |k: &str| Ok(m.get(&format!("{arch}.{k}")).and_then(gguf_header::as_f64));
            let err = rope_scaling(path, &m, &arch, factors, &opt_f64).unwrap_err();
            assert!(err.to_string().contains(want), "{err}");
        }
    }
}
