//! Mixture-of-experts blocks in GGUF files as llama.cpp's `convert_hf_to_gguf.py` writes them:
//! `qwen3moe` (Qwen3-MoE) and `llama` with `llama.expert_count` (Mixtral).
//!
//! - metadata: `{arch}.expert_count`, `{arch}.expert_used_count`, and for qwen3moe
//!   `{arch}.expert_feed_forward_length` (Mixtral's experts are `feed_forward_length` wide).
//!   llama.cpp renormalises the top-k weights of both (its `build_moe_ffn` with `norm_w`);
//!   an `{arch}.expert_weights_norm = false` is honoured where a file has it;
//! - the router `blk.N.ffn_gate_inp.weight` ([experts, hidden]);
//! - one stacked tensor per projection, `blk.N.ffn_{gate,up,down}_exps.weight`, GGUF dims
//!   `[in, out, experts]` (row-major `[experts, out, in]`): expert `e` is the `e`-th of
//!   `experts` equal byte ranges, since every row is quantized on its own. The reader exposes
//!   each as the Hugging Face tensor `...experts.E.{gate,up,down}_proj.weight` (`w1`/`w3`/`w2`
//!   for Mixtral) without copying;
//! - dense blocks: llama.cpp's qwen3moe has none (its converter cannot map a Qwen3-MoE's
//!   `mlp_only_layers`); a block without a router is read as dense, from `ffn_gate` /
//!   `ffn_up` / `ffn_down`, should a file have one.
//!
//! Older Mixtral files with one tensor per expert (`blk.N.ffn_gate.E.weight`) are not read.

use std::path::Path;

use super::moe::{MoeNames, MoeSpec};
use super::Architecture;
use crate::error::Result;

/// Where a llama.cpp MoE tensor goes.
pub enum MoeTensor {
    /// The router of a block: its Hugging Face tensor name.
    Router(String),
    /// A stacked projection: one Hugging Face tensor name per expert, in order.
    Experts(Vec<String>),
}

/// The MoE spec of a GGUF of `arch` (`None`: dense). `usize_key` reads `{arch}.KEY`,
/// `bool_key` likewise; `has` says whether a tensor is present.
pub fn moe_spec(
    path: &Path,
    arch: Architecture,
    layers: usize,
    ffn: usize,
    usize_key: &dyn Fn(&str) -> Result<Option<usize>>,
    bool_key: &dyn Fn(&str) -> Option<bool>,
    has: &dyn Fn(&str) -> bool,
) -> Result<Option<MoeSpec>> {
    if MoeNames::of(arch).is_none() {
        return Ok(None);
    }
    let need = |k: &str| -> Result<usize> {
        usize_key(k)?.ok_or_else(|| super::gguf::config_err(path, format!("missing {k}")))
    };
    let expert_ffn = match arch {
        Architecture::Qwen3Moe => need("expert_feed_forward_length")?,
        _ => ffn,
    };
    let dense_layers = (0..layers)
        .filter(|l| !has(&format!("blk.{l}.ffn_gate_inp.weight")))
        .collect();
    Ok(Some(MoeSpec {
        experts: need("expert_count")?,
        top_k: need("expert_used_count")?,
        expert_ffn,
        norm_top_k: bool_key("expert_weights_norm").unwrap_or(true),
        dense_layers,
    }))
}

/// The architecture a `llama` GGUF is: Mixtral when it has experts.
pub fn llama_or_mixtral(expert_count: Option<usize>) -> Architecture {
    match expert_count {
        Some(n) if n > 0 => Architecture::Mixtral,
        _ => Architecture::Llama,
    }
}

/// The Hugging Face names of llama.cpp MoE tensor `gguf` in a model of `arch` with `experts`
/// experts per block; `None` for any other tensor.
pub fn moe_tensor(gguf: &str, arch: Architecture, experts: usize) -> Option<MoeTensor> {
    let names = MoeNames::of(arch)?;
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let which = match part {
        "ffn_gate_inp.weight" => return Some(MoeTensor::Router(names.router(layer) + ".weight")),
        "ffn_gate_exps.weight" => 0,
        "ffn_up_exps.weight" => 1,
        "ffn_down_exps.weight" => 2,
        _ => return None,
    };
    Some(MoeTensor::Experts(
        (0..experts)
            .map(|e| names.expert(layer, e)[which].clone() + ".weight")
            .collect(),
    ))
}

/// The llama.cpp name of a Hugging Face MoE tensor name (for error messages): the stacked
/// tensor an expert lives in, or the router.
pub fn gguf_moe_name(hf: &str) -> Option<String> {
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (_block, rest) = rest.split_once('.')?;
    if rest == "gate.weight" {
        return Some(format!("blk.{layer}.ffn_gate_inp.weight"));
    }
    let rest = rest.strip_prefix("experts.")?;
    let (expert, proj) = rest.split_once('.')?;
    let stack = match proj {
        "gate_proj.weight" | "w1.weight" => "ffn_gate_exps",
        "up_proj.weight" | "w3.weight" => "ffn_up_exps",
        "down_proj.weight" | "w2.weight" => "ffn_down_exps",
        _ => return None,
    };
    Some(format!("blk.{layer}.{stack}.weight[{expert}]"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stacked_experts_and_routers_get_hugging_face_names() {
        let Some(MoeTensor::Experts(names)) =
            moe_tensor("blk.3.ffn_up_exps.weight", Architecture::Mixtral, 2)
        else {
            panic!("a stack")
        };
        assert_eq!(
            names,
            [
                "model.layers.3.block_sparse_moe.experts.0.w3.weight",
                "model.layers.3.block_sparse_moe.experts.1.w3.weight"
            ]
        );
        let Some(MoeTensor::Router(r)) =
            moe_tensor("blk.1.ffn_gate_inp.weight", Architecture::Qwen3Moe, 4)
        else {
            panic!("a router")
        };
        assert_eq!(r, "model.layers.1.mlp.gate.weight");
        assert!(moe_tensor("blk.1.ffn_gate.weight", Architecture::Qwen3Moe, 4).is_none());
        assert!(moe_tensor("blk.1.ffn_gate_exps.weight", Architecture::Llama, 4).is_none());
        assert_eq!(
            gguf_moe_name("model.layers.1.mlp.experts.2.down_proj.weight").as_deref(),
            Some("blk.1.ffn_down_exps.weight[2]")
        );
        assert_eq!(
            gguf_moe_name("model.layers.0.block_sparse_moe.gate.weight").as_deref(),
            Some("blk.0.ffn_gate_inp.weight")
        );
    }
}
