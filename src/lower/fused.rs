//! The layers serving engines fuse, and what that does to NVFP4 weights.
//!
//! vLLM and SGLang load q/k/v as one `qkv_proj`, a dense MLP's gate/up as one `gate_up_proj`,
//! and a MoE block's experts as one fused MoE layer (each expert's gate/up as its `w13`).
//! A fused layer has one quantization scheme ([`Fused`]: what `fpx export` checks) and, for
//! NVFP4, **one tensor scale**: the engines keep a single global scale per fused matrix
//! (vLLM's `CompressedTensorsW4A4Fp4` takes the largest stored divisor over q/k/v, its NVFP4
//! MoE takes gate's for gate and up), so block scales made against each projection's own tensor
//! scale would decode wrongly there. fpx therefore quantizes the NVFP4 members of a fused group
//! against the group's largest magnitude (the tensor scale of the concatenated matrix, as
//! llm-compressor's fused-layer global scales do), on every backend and in the export, so the
//! values fpx evaluates are the values an engine computes with. [`TensorScaleGroups`] finds the
//! groups; [`nvfp4_tensor_amax`] reads the amax each member is quantized against.
//!
//! Calibration measures each layer alone against its own tensor scale (an estimate: the
//! group's scale is at least as coarse, and equal for the group's largest member).

use std::collections::{BTreeMap, HashMap};

use crate::error::Result;
use crate::formats::{nvfp4::tensor_amax, Format};
use crate::ir::{Graph, Linear, LinearKind};
use crate::model::WeightSource;

/// A layer group the engines fuse into one layer of one scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fused {
    Qkv,
    GateUp,
    /// Every projection of every expert of a MoE block.
    Experts,
}

impl Fused {
    /// The scheme group of linear `l`, if it is in one.
    pub fn of(l: &Linear) -> Option<Fused> {
        match (l.kind, l.expert) {
            (_, Some(_)) => Some(Fused::Experts),
            (LinearKind::Q | LinearKind::K | LinearKind::V, None) => Some(Fused::Qkv),
            (LinearKind::Gate | LinearKind::Up, None) => Some(Fused::GateUp),
            _ => None,
        }
    }
}

/// The tensor-scale group of a linear in block `layer`: q/k/v, a dense gate/up, or one
/// expert's gate/up (`Some(expert)`). Down and o projections stand alone.
fn tensor_scale_key(l: &Linear, layer: usize) -> Option<(usize, Fused, Option<usize>)> {
    match l.kind {
        LinearKind::Q | LinearKind::K | LinearKind::V => Some((layer, Fused::Qkv, None)),
        LinearKind::Gate | LinearKind::Up => Some((layer, Fused::GateUp, l.expert)),
        _ => None,
    }
}

/// Linear names grouped by the matrix the engines fuse them into (groups of two or more).
pub struct TensorScaleGroups(Vec<Vec<(String, String)>>);

impl TensorScaleGroups {
    /// The groups of `graph`: per member, (linear name, weight tensor).
    pub fn of(graph: &Graph) -> TensorScaleGroups {
        let mut groups: BTreeMap<_, Vec<(String, String)>> = BTreeMap::new();
        for (id, l) in graph.linears() {
            let n = graph.node(id);
            if let Some(key) = n.layer.and_then(|b| tensor_scale_key(l, b)) {
                groups
                    .entry(key)
                    .or_default()
                    .push((n.name.clone(), l.weight.clone()));
            }
        }
        TensorScaleGroups(groups.into_values().filter(|g| g.len() > 1).collect())
    }
}

/// Linear name -> the amax its NVFP4 weights are quantized against, for every linear that
/// `format_of` puts in NVFP4 together with another member of its fused group (the others use
/// their own amax). Reads those members' weights once.
pub fn nvfp4_tensor_amax(
    graph: &Graph,
    weights: &dyn WeightSource,
    format_of: &dyn Fn(&str) -> Option<Format>,
) -> Result<HashMap<String, f32>> {
    let mut out = HashMap::new();
    for group in TensorScaleGroups::of(graph).0 {
        let members: Vec<&(String, String)> = group
            .iter()
            .filter(|(name, _)| format_of(name) == Some(Format::Nvfp4))
            .collect();
        if members.len() < 2 {
            continue;
        }
        let mut amax = 0f32;
        for (_, tensor) in &members {
            amax = amax.max(tensor_amax(&weights.tensor(tensor)?.data));
        }
        for (name, _) in members {
            out.insert(name.clone(), amax);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::synthetic::{random_weights, tiny_spec};
    use crate::model::{Architecture, Tensor};

    struct Weights(HashMap<String, Tensor>);

    impl WeightSource for Weights {
        fn tensor(&self, name: &str) -> Result<Tensor> {
            Ok(self.0[name].clone())
        }
        fn shape(&self, name: &str) -> Result<Vec<usize>> {
            Ok(self.0[name].shape.clone())
        }
        fn contains(&self, name: &str) -> bool {
            self.0.contains_key(name)
        }
        fn names(&self) -> Vec<String> {
            self.0.keys().cloned().collect()
        }
    }

    #[test]
    fn nvfp4_members_of_a_fused_group_share_the_group_amax() {
        let spec = tiny_spec(Architecture::Qwen3Moe);
        let graph = Graph::build(&spec);
        let w = Weights(random_weights(&spec, 3).into_iter().collect());
        let amax = |t: &str| tensor_amax(&w.0[&format!("{t}.weight")].data);
        // q and v in NVFP4, k in FP8; expert 1's gate and up in NVFP4; a down projection too.
        let nvfp4 = [
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.v_proj",
            "model.layers.1.mlp.experts.1.gate_proj",
            "model.layers.1.mlp.experts.1.up_proj",
            "model.layers.1.mlp.experts.1.down_proj",
            "model.layers.1.mlp.experts.2.gate_proj",
        ];
        let got = nvfp4_tensor_amax(&graph, &w, &|n| {
            nvfp4
                .contains(&n)
                .then_some(Format::Nvfp4)
                .or(Some(Format::Fp8))
        })
        .unwrap();
        let q = "model.layers.0.self_attn.q_proj";
        let v = "model.layers.0.self_attn.v_proj";
        assert_eq!(got[q], amax(q).max(amax(v)));
        assert_eq!(got[q], got[v]);
        assert!(
            amax(q) != amax(v),
            "the test needs members of different amax"
        );
        let (g, u) = (
            "model.layers.1.mlp.experts.1.gate_proj",
            "model.layers.1.mlp.experts.1.up_proj",
        );
        assert_eq!(got[g], amax(g).max(amax(u)));
        // Alone in its group (expert 2's up is FP8), or not fused at all: its own amax.
        assert_eq!(got.len(), 4, "{got:?}");
    }
}
