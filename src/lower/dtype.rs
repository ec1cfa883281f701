//! The element type of activation buffers and of the KV cache ([`ActDtype`]): FP32, or BF16 /
//! FP16 as inference engines run them. One rule holds on every backend and in the CPU
//! interpreter: a kernel loads 16-bit values, computes in FP32 (accumulators, norm statistics,
//! softmax, the RoPE rotation) and rounds to the buffer's type, to nearest even, when it stores
//! an activation row or a KV-cache row. The logits are an activation buffer too (engines compute
//! lm_head in the model's dtype and upcast afterwards), so greedy argmax sees rounded logits.
//!
//! Conversions go through the `half` crate (round to nearest even, subnormals, NaN kept NaN),
//! the same rounding the kernels' `fpx::store_act` performs (`kernels/fpx_common.cuh`).

use half::{bf16, f16};
use serde::{Deserialize, Serialize};

use crate::ir::{Graph, Op};
use crate::model::WeightSource;

/// Element type of activations between kernels and of the KV cache.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Default,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum ActDtype {
    /// FP32 everywhere: the reference execution.
    #[default]
    F32,
    Bf16,
    F16,
}

impl ActDtype {
    pub const ALL: [ActDtype; 3] = [ActDtype::F32, ActDtype::Bf16, ActDtype::F16];

    pub fn name(self) -> &'static str {
        match self {
            ActDtype::F32 => "f32",
            ActDtype::Bf16 => "bf16",
            ActDtype::F16 => "f16",
        }
    }

    /// Bytes of one element.
    pub fn bytes(self) -> usize {
        match self {
            ActDtype::F32 => 4,
            ActDtype::Bf16 | ActDtype::F16 => 2,
        }
    }

    /// The activation type matching a checkpoint tensor's stored dtype (safetensors and GGUF
    /// names): `F16` and `F32` run in their own type; `BF16`, and quantized storage (GGUF block
    /// types such as `Q4_1`, whose models engines serve in BF16), in BF16.
    pub fn of_stored(dtype: &str) -> ActDtype {
        match dtype.to_ascii_uppercase().as_str() {
            "F32" | "FLOAT32" => ActDtype::F32,
            "F16" | "FLOAT16" | "FP16" => ActDtype::F16,
            _ => ActDtype::Bf16,
        }
    }

    /// The checkpoint's activation type: that of the stored type of `graph`'s embedding table
    /// ([`ActDtype::of_stored`]; what an engine runs the model in); BF16 when unknown.
    pub fn of_checkpoint(graph: &Graph, weights: &dyn WeightSource) -> ActDtype {
        let table = graph
            .topo_order()
            .iter()
            .find_map(|&id| match &graph.node(id).op {
                Op::Embedding { tensor, .. } => Some(tensor.clone()),
                _ => None,
            });
        table
            .and_then(|t| weights.stored_dtype(&t))
            .map_or(ActDtype::Bf16, |d| ActDtype::of_stored(&d))
    }

    /// One unit in the last place relative to a value, at most: the largest relative move a
    /// stored value makes when two summation orders round it to neighbouring numbers of this
    /// type (2^-23 for FP32, 2^-7 for BF16's 7 stored significand bits, 2^-10 for FP16's 10).
    /// Comparisons of two executions at this type allow it.
    pub fn ulp(self) -> f32 {
        match self {
            ActDtype::F32 => f32::EPSILON,
            ActDtype::Bf16 => 2f32.powi(-7),
            ActDtype::F16 => 2f32.powi(-10),
        }
    }

    /// `v` rounded to this type (to nearest even) and widened back.
    pub fn round(self, v: f32) -> f32 {
        match self {
            ActDtype::F32 => v,
            ActDtype::Bf16 => bf16::from_f32(v).to_f32(),
            ActDtype::F16 => f16::from_f32(v).to_f32(),
        }
    }

    /// Rounds every value in place (what a kernel's store does to a row).
    pub fn round_slice(self, v: &mut [f32]) {
        if self != ActDtype::F32 {
            v.iter_mut().for_each(|x| *x = self.round(*x));
        }
    }

    /// Little-endian bytes of `v` in this type (rounded).
    pub fn encode(self, v: &[f32]) -> Vec<u8> {
        match self {
            ActDtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ActDtype::Bf16 => v
                .iter()
                .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
                .collect(),
            ActDtype::F16 => v
                .iter()
                .flat_map(|&x| f16::from_f32(x).to_le_bytes())
                .collect(),
        }
    }

    /// The values of little-endian `bytes` of this type.
    pub fn decode(self, bytes: &[u8]) -> Vec<f32> {
        match self {
            ActDtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            ActDtype::Bf16 => bytes
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            ActDtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        }
    }
}

impl std::fmt::Display for ActDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_round_trips_rounded_values() {
        let v = [1.0f32, -0.1, 2.71, 65504.0, 1e-6, f32::INFINITY];
        for d in ActDtype::ALL {
            let back = d.decode(&d.encode(&v));
            let want: Vec<f32> = v.iter().map(|&x| d.round(x)).collect();
            assert_eq!(back, want, "{d}");
            assert_eq!(d.encode(&v).len(), v.len() * d.bytes());
        }
        assert!(ActDtype::Bf16.round(f32::NAN).is_nan());
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        // 1 + 2^-8 lies halfway between two BF16 values (1 and 1 + 2^-7): ties go to even (1).
        assert_eq!(ActDtype::Bf16.round(1.0 + 2f32.powi(-8)), 1.0);
        assert_eq!(
            ActDtype::Bf16.round(1.0 + 3.0 * 2f32.powi(-8)),
            1.0 + 2.0 * 2f32.powi(-7)
        );
        assert_eq!(ActDtype::F16.round(1.0 + 2f32.powi(-11)), 1.0);
        assert_eq!(ActDtype::F16.round(70000.0), f32::INFINITY);
    }

    #[test]
    fn checkpoint_dtypes_map_to_activation_types() {
        assert_eq!(ActDtype::of_stored("BF16"), ActDtype::Bf16);
        assert_eq!(ActDtype::of_stored("F16"), ActDtype::F16);
        assert_eq!(ActDtype::of_stored("F32"), ActDtype::F32);
        assert_eq!(ActDtype::of_stored("Q4_K"), ActDtype::Bf16);
    }
}
