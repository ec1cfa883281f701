//! Mixture-of-experts feed-forward blocks (Qwen3-MoE, Mixtral): the hyper-parameters
//! ([`MoeSpec`]), how each architecture names the router and the experts' tensors
//! ([`MoeNames`]), and the `config.json` keys that set them.
//!
//! A MoE block replaces the dense MLP of a decoder layer: a router (a bias-free linear layer
//! `[experts, hidden]`) scores every expert per token, the softmax of the scores picks the
//! `top_k` best (renormalised to sum to one where the model says so), and the block's output
//! is the weighted sum of those experts' SiLU-gated MLPs. transformers' `Qwen3MoeTopKRouter`
//! and `MixtralTopKRouter` both take the softmax over all experts first, then the top-k of the
//! probabilities; Mixtral always renormalises, Qwen3-MoE when `norm_topk_prob` is set.
//!
//! Keys (transformers 5 `Qwen3MoeConfig` / `MixtralConfig`): `num_experts` (Qwen3-MoE; 5 saves
//! it as `num_local_experts`, Mixtral's name), `num_experts_per_tok`, `moe_intermediate_size`
//! (Qwen3-MoE; Mixtral's experts are `intermediate_size` wide), `norm_topk_prob`,
//! `decoder_sparse_step` and `mlp_only_layers` (Qwen3-MoE layers that keep a dense MLP of
//! `intermediate_size`). `router_aux_loss_coef`, `output_router_logits` and
//! `router_jitter_noise` only act in training ([`super::config_keys::IGNORED_KEYS`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::config::ConfigError;
use super::Architecture;

/// The MoE blocks of a model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoeSpec {
    /// Experts per MoE block.
    pub experts: usize,
    /// Experts each token is routed to.
    pub top_k: usize,
    /// Width of one expert's MLP.
    pub expert_ffn: usize,
    /// The top-k routing weights are divided by their sum.
    pub norm_top_k: bool,
    /// Decoder layers that keep a dense MLP of `intermediate_size` (Qwen3-MoE's
    /// `mlp_only_layers` and the layers `decoder_sparse_step` skips), ascending.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dense_layers: Vec<usize>,
}

impl MoeSpec {
    /// Whether decoder layer `layer` has a MoE block.
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.dense_layers.binary_search(&layer).is_err()
    }

    /// Rules on the numbers, for [`super::config::validate_spec`].
    pub fn validate(&self, layers: usize) -> Result<(), String> {
        crate::limits::at_most(self.experts, MAX_EXPERTS, "num_experts")?;
        if self.experts == 0 || self.expert_ffn == 0 {
            return Err("a MoE block needs at least one expert of non-zero width".into());
        }
        if self.top_k == 0 || self.top_k > self.experts {
            return Err(format!(
                "num_experts_per_tok {} must be between 1 and num_experts {}",
                self.top_k, self.experts
            ));
        }
        if let Some(l) = self.dense_layers.iter().find(|&&l| l >= layers) {
            return Err(format!(
                "dense (mlp_only) layer {l} is outside the model's {layers} layers"
            ));
        }
        if !self.dense_layers.windows(2).all(|w| w[0] < w[1]) {
            return Err("dense layers must be ascending and distinct".into());
        }
        Ok(())
    }
}

/// More experts than any published model has (DeepSeek-V3: 256); a bound on what a config
/// can make fpx allocate.
pub const MAX_EXPERTS: usize = 1024;

/// How an architecture names the tensors of a MoE block, relative to `model.layers.{i}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeNames {
    /// The block's module (`mlp`, `block_sparse_moe`).
    pub block: &'static str,
    /// Gate, up and down projection of one expert.
    pub gate: &'static str,
    pub up: &'static str,
    pub down: &'static str,
}

impl MoeNames {
    /// The names `arch` uses (`None`: a dense architecture).
    pub fn of(arch: Architecture) -> Option<MoeNames> {
        match arch {
            Architecture::Qwen3Moe => Some(MoeNames {
                block: "mlp",
                gate: "gate_proj",
                up: "up_proj",
                down: "down_proj",
            }),
            // Mixtral's w1 is the gate, w3 the up and w2 the down projection.
            Architecture::Mixtral => Some(MoeNames {
                block: "block_sparse_moe",
                gate: "w1",
                up: "w3",
                down: "w2",
            }),
            _ => None,
        }
    }

    /// The router's module name in layer `layer`.
    pub fn router(&self, layer: usize) -> String {
        format!("model.layers.{layer}.{}.gate", self.block)
    }

    /// Module names of expert `expert`'s gate, up and down projections in layer `layer`.
    pub fn expert(&self, layer: usize, expert: usize) -> [String; 3] {
        let p = format!("model.layers.{layer}.{}.experts.{expert}", self.block);
        [self.gate, self.up, self.down].map(|n| format!("{p}.{n}"))
    }
}

/// Reads (and removes from `other`) the MoE keys of a config of architecture `arch`:
/// `Some` for a MoE architecture, `None` for a dense one (whose config must not set them).
/// `intermediate_size` is Mixtral's expert width.
pub fn from_config(
    arch: Architecture,
    other: &mut BTreeMap<String, Value>,
    intermediate_size: usize,
    layers: usize,
) -> Result<Option<MoeSpec>, ConfigError> {
    const KEYS: [&str; 7] = [
        "num_experts",
        "num_local_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "norm_topk_prob",
        "decoder_sparse_step",
        "mlp_only_layers",
    ];
    let mut taken: BTreeMap<&str, Value> = BTreeMap::new();
    for key in KEYS {
        if let Some(v) = other.remove(key) {
            if !v.is_null() {
                taken.insert(key, v);
            }
        }
    }
    let uint = |key: &str| -> Result<Option<usize>, ConfigError> {
        match taken.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| ConfigError::Invalid(format!("{key} = {v}: expected an integer"))),
        }
    };
    let flag = |key: &str| -> Result<Option<bool>, ConfigError> {
        match taken.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| ConfigError::Invalid(format!("{key} = {v}: expected a boolean"))),
        }
    };
    let experts = match (uint("num_experts")?, uint("num_local_experts")?) {
        (Some(a), Some(b)) if a != b => {
            return Err(ConfigError::Invalid(format!(
                "num_experts = {a} and num_local_experts = {b} disagree"
            )))
        }
        (a, b) => a.or(b),
    };
    let top_k = uint("num_experts_per_tok")?;
    let (experts, top_k, expert_ffn, norm_top_k, dense_layers) = match arch {
        Architecture::Qwen3Moe => {
            let step = uint("decoder_sparse_step")?.unwrap_or(1);
            if step == 0 {
                return Err(ConfigError::Invalid(
                    "decoder_sparse_step = 0: must be > 0".into(),
                ));
            }
            let only: Vec<usize> = match taken.get("mlp_only_layers") {
                None => Vec::new(),
                Some(v) => serde_json::from_value(v.clone()).map_err(|_| {
                    ConfigError::Invalid(format!(
                        "mlp_only_layers = {v}: expected a list of layer indices"
                    ))
                })?,
            };
            if let Some(l) = only.iter().find(|&&l| l >= layers) {
                return Err(ConfigError::Invalid(format!(
                    "mlp_only_layers names layer {l}, outside the model's {layers} layers"
                )));
            }
            let experts = experts.unwrap_or(128);
            // transformers: a layer is sparse when it is not listed, the model has experts
            // and (layer + 1) is a multiple of decoder_sparse_step.
            let dense = (0..layers)
                .filter(|l| only.contains(l) || experts == 0 || (l + 1) % step != 0)
                .collect();
            (
                experts,
                top_k.unwrap_or(8),
                uint("moe_intermediate_size")?.unwrap_or(768),
                flag("norm_topk_prob")?.unwrap_or(false),
                dense,
            )
        }
        Architecture::Mixtral => {
            for key in [
                "moe_intermediate_size",
                "decoder_sparse_step",
                "mlp_only_layers",
            ] {
                if let Some(v) = taken.get(key) {
                    return Err(ConfigError::Invalid(format!(
                        "{key} = {v} is not supported (Mixtral's transformers class has no such key)"
                    )));
                }
            }
            if flag("norm_topk_prob")? == Some(false) {
                return Err(ConfigError::Invalid(
                    "norm_topk_prob = false is not supported (Mixtral always renormalises its \
                     top-k weights)"
                        .into(),
                ));
            }
            (
                experts.unwrap_or(8),
                top_k.unwrap_or(2),
                intermediate_size,
                true,
                Vec::new(),
            )
        }
        _ => {
            return match taken.keys().next() {
                Some(key) => Err(ConfigError::Invalid(format!(
                    "{key} is a mixture-of-experts key, but {arch:?} is a dense architecture"
                ))),
                None => Ok(None),
            }
        }
    };
    Ok(Some(MoeSpec {
        experts,
        top_k,
        expert_ffn,
        norm_top_k,
        dense_layers,
    }))
}

/// The config keys a checkpoint of `arch` with these MoE blocks carries (inverse of
/// [`from_config`]).
pub fn to_config(arch: Architecture, moe: &MoeSpec) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    out.insert("num_experts_per_tok".into(), moe.top_k.into());
    if arch == Architecture::Qwen3Moe {
        out.insert("num_experts".into(), moe.experts.into());
        out.insert("moe_intermediate_size".into(), moe.expert_ffn.into());
        out.insert("norm_topk_prob".into(), moe.norm_top_k.into());
        out.insert("mlp_only_layers".into(), moe.dense_layers.clone().into());
    } else {
        out.insert("num_local_experts".into(), moe.experts.into());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn keys(v: Value) -> BTreeMap<String, Value> {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn qwen3_moe_keys_and_sparse_layers() {
        let mut other = keys(json!({
            "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
            "norm_topk_prob": true, "decoder_sparse_step": 2, "mlp_only_layers": [3],
            "unrelated": 1
        }));
        let moe = from_config(Architecture::Qwen3Moe, &mut other, 48, 4)
            .unwrap()
            .unwrap();
        assert_eq!(moe.dense_layers, vec![0, 2, 3]);
        assert!(moe.is_moe_layer(1) && !moe.is_moe_layer(3));
        assert_eq!((moe.experts, moe.top_k, moe.expert_ffn), (8, 2, 24));
        assert!(moe.norm_top_k);
        assert_eq!(other.keys().collect::<Vec<_>>(), ["unrelated"]);
        let mut again = to_config(Architecture::Qwen3Moe, &moe);
        let mut round = from_config(Architecture::Qwen3Moe, &mut again, 48, 4).unwrap();
        // to_config lists the dense layers instead of a step: the same layers.
        assert_eq!(round.take(), Some(moe));
    }

    #[test]
    fn mixtral_defaults_and_refusals() {
        let mut other = keys(json!({"num_local_experts": 4}));
        let moe = from_config(Architecture::Mixtral, &mut other, 48, 2)
            .unwrap()
            .unwrap();
        assert_eq!((moe.experts, moe.top_k, moe.expert_ffn), (4, 2, 48));
        assert!(moe.norm_top_k && moe.dense_layers.is_empty());
        for bad in [
            json!({"norm_topk_prob": false}),
            json!({"moe_intermediate_size": 8}),
            json!({"num_experts": 4, "num_local_experts": 8}),
            json!({"num_experts_per_tok": "two"}),
        ] {
            let err = from_config(Architecture::Mixtral, &mut keys(bad.clone()), 48, 2);
            assert!(err.is_err(), "{bad}");
        }
        let err = from_config(
            Architecture::Llama,
            &mut keys(json!({"num_experts": 4})),
            48,
            2,
        )
        .unwrap_err();
        assert!(format!("{err:?}").contains("dense architecture"), "{err:?}");
    }

    #[test]
    fn names_per_architecture() {
        let q = MoeNames::of(Architecture::Qwen3Moe).unwrap();
        assert_eq!(q.router(1), "model.layers.1.mlp.gate");
        assert_eq!(q.expert(1, 2)[0], "model.layers.1.mlp.experts.2.gate_proj");
        let m = MoeNames::of(Architecture::Mixtral).unwrap();
        assert_eq!(
            m.expert(0, 3),
            [
                "model.layers.0.block_sparse_moe.experts.3.w1",
                "model.layers.0.block_sparse_moe.experts.3.w3",
                "model.layers.0.block_sparse_moe.experts.3.w2",
            ]
        );
        assert!(MoeNames::of(Architecture::Qwen3).is_none());
    }
}
