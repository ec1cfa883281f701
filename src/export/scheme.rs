//! Which compressed-tensors scheme each plan format becomes, and the `quantization_config`
//! that lists them.
//!
//! Field names, values and tensor names follow compressed-tensors 0.20 (`QuantizationArgs`,
//! `QuantizationScheme`, `QuantizationConfig.to_dict()`, and the compressors'
//! `compression_param_names`):
//!
//! | fpx   | weights args                                                     | group `format`         | tensors |
//! |-------|------------------------------------------------------------------|------------------------|---------|
//! | fp8   | 8-bit float, `channel`                                           | `float-quantized`      | `weight` F8_E4M3, `weight_scale` [N, 1] |
//! | nvfp4 | 4-bit float, `tensor_group` 16, `scale_dtype` float8_e4m3fn      | `nvfp4-pack-quantized` | `weight_packed` U8 [N, K/2], `weight_scale` F8_E4M3 [N, K/16], `weight_global_scale` F32 `[1]` |
//! | mxfp4 | 4-bit float, `group` 32, `scale_dtype` uint8                     | `mxfp4-pack-quantized` | `weight_packed` U8 [N, K/2], `weight_scale` U8 [N, K/32] |
//!
//! Dynamic activations: fp8 per `token`, mxfp4 per `group` 32 (both dynamic, as fpx's). fpx's
//! NVFP4 activations take their tensor scale from each buffer; compressed-tensors' take a static
//! `input_global_scale` from calibration, so that scheme is refused by name.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::formats::Format;

/// One compressed-tensors scheme: the weight format and the dynamic activation format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Scheme {
    pub weights: Format,
    pub activations: Option<Format>,
}

impl Scheme {
    /// The scheme of a layer, or why compressed-tensors cannot express it.
    pub fn new(layer: &str, weights: Format, activations: Option<Format>) -> Result<Scheme> {
        if let Some(Format::Nvfp4 | Format::Fp16) = activations {
            return Err(Error::Layer {
                layer: layer.to_string(),
                reason: format!(
                    "activations in {}: compressed-tensors cannot express fpx's dynamic \
                     per-buffer NVFP4 activations (its NVFP4 activations need a static \
                     input_global_scale) nor 16-bit activation rounding; plan this layer with \
                     fp8 or mxfp4 activations, or none",
                    activations.expect("matched")
                ),
            });
        }
        if weights == Format::Fp16 && activations.is_some() {
            return Err(Error::Layer {
                layer: layer.to_string(),
                reason: "16-bit weights with quantized activations: compressed-tensors has no \
                         activation-only scheme"
                    .into(),
            });
        }
        Ok(Scheme {
            weights,
            activations,
        })
    }

    /// compressed-tensors' per-group `format` (the compressor's registered name).
    pub fn ct_format(self) -> &'static str {
        match self.weights {
            Format::Fp8 => "float-quantized",
            Format::Nvfp4 => "nvfp4-pack-quantized",
            Format::Mxfp4 => "mxfp4-pack-quantized",
            Format::Fp16 => "dense",
        }
    }

    fn weight_args(self) -> Value {
        args(self.weights, false)
    }
}

/// `QuantizationArgs` of a format, as `to_dict()` writes them.
fn args(f: Format, activation: bool) -> Value {
    match (f, activation) {
        (Format::Fp8, false) => json!({"num_bits": 8, "type": "float", "symmetric": true,
            "group_size": null, "strategy": "channel", "dynamic": false}),
        (Format::Fp8, true) => json!({"num_bits": 8, "type": "float", "symmetric": true,
            "group_size": null, "strategy": "token", "dynamic": true}),
        (Format::Nvfp4, _) => json!({"num_bits": 4, "type": "float", "symmetric": true,
            "group_size": 16, "strategy": "tensor_group", "dynamic": false,
            "scale_dtype": "torch.float8_e4m3fn"}),
        (Format::Mxfp4, a) => json!({"num_bits": 4, "type": "float", "symmetric": true,
            "group_size": 32, "strategy": "group", "dynamic": a,
            "scale_dtype": "torch.uint8"}),
        (Format::Fp16, _) => Value::Null,
    }
}

/// The `quantization_config` of a model whose quantized layers use `groups` (scheme -> exact
/// layer names, in model order) and whose 16-bit linears are `ignore`.
pub fn quantization_config(groups: &BTreeMap<Scheme, Vec<String>>, ignore: &[String]) -> Value {
    let mut config_groups = serde_json::Map::new();
    for (i, (scheme, targets)) in groups.iter().enumerate() {
        let input = scheme.activations.map_or(Value::Null, |a| args(a, true));
        config_groups.insert(
            format!("group_{i}"),
            json!({
                "targets": targets,
                "weights": scheme.weight_args(),
                "input_activations": input,
                "output_activations": null,
                "format": scheme.ct_format(),
            }),
        );
    }
    let formats: std::collections::BTreeSet<&str> = groups.keys().map(|s| s.ct_format()).collect();
    let format = match formats.len() {
        1 => formats.into_iter().next().expect("one").to_string(),
        _ => "mixed-precision".to_string(),
    };
    json!({
        "quant_method": "compressed-tensors",
        "format": format,
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": ignore,
        "kv_cache_scheme": null,
        "global_compression_ratio": null,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvfp4_activations_are_refused_by_name() {
        let e = Scheme::new(
            "model.layers.0.mlp.up_proj",
            Format::Fp8,
            Some(Format::Nvfp4),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("model.layers.0.mlp.up_proj") && e.contains("NVFP4"),
            "{e}"
        );
        assert!(Scheme::new("x", Format::Fp16, Some(Format::Fp8)).is_err());
        assert!(Scheme::new("x", Format::Nvfp4, Some(Format::Mxfp4)).is_ok());
    }

    #[test]
    fn one_scheme_is_not_mixed_precision() {
        let s = Scheme::new("a", Format::Nvfp4, None).unwrap();
        let one = quantization_config(&BTreeMap::from([(s, vec!["a".into()])]), &[]);
        assert_eq!(one["format"], "nvfp4-pack-quantized");
        let t = Scheme::new("b", Format::Fp8, Some(Format::Fp8)).unwrap();
        let two = quantization_config(
            &BTreeMap::from([(s, vec!["a".into()]), (t, vec!["b".into()])]),
            &["lm_head".into()],
        );
        assert_eq!(two["format"], "mixed-precision");
        let g = &two["config_groups"];
        assert_eq!(g["group_0"]["weights"]["strategy"], "channel");
        assert_eq!(g["group_0"]["input_activations"]["strategy"], "token");
        assert_eq!(g["group_1"]["weights"]["strategy"], "tensor_group");
        assert_eq!(g["group_1"]["targets"][0], "a");
        assert_eq!(two["ignore"][0], "lm_head");
    }
}
