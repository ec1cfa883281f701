//! The parameters the CPU interpreter runs on, loaded per schedule slot: the embedding table,
//! each RMSNorm weight and each linear layer's FP32 weights (fake-quantized where the precision
//! map assigns a format: quantized to the format's byte layout and dequantized, so the values
//! are exactly the ones the kernels decode). A `keep` predicate selects the nodes whose
//! parameters are loaded, which is how calibration streams one stage at a time.

use std::collections::HashMap;
use std::sync::Arc;

use super::{mat, Mat};
use crate::error::{Error, Result};
use crate::formats::Format;
use crate::ir::{Graph, Linear, Node, Op};
use crate::lower::{LinearPrecision, PrecisionMap, Schedule};
use crate::model::{Tensor, WeightSource};

/// A linear layer's parameters as the CPU interpreter runs them.
#[derive(Debug, Clone)]
pub struct LinearWeights {
    /// Row-major `[out, in]`, already fake-quantized when the layer has a format.
    pub weight: Arc<Vec<f32>>,
    pub bias: Option<Arc<Vec<f32>>>,
    /// Activations are quantized to this format before the product.
    pub activations: Option<Format>,
    /// The same weights packed for the SIMD product ([`LinearWeights::with_panels`]).
    #[cfg(target_arch = "x86_64")]
    panels: Option<Arc<super::linear_packed::Panels>>,
}

impl LinearWeights {
    pub fn new(
        weight: Arc<Vec<f32>>,
        bias: Option<Arc<Vec<f32>>>,
        activations: Option<Format>,
    ) -> LinearWeights {
        LinearWeights {
            weight,
            bias,
            activations,
            #[cfg(target_arch = "x86_64")]
            panels: None,
        }
    }

    /// These weights with a second copy packed for the SIMD product, where the CPU has AVX-512
    /// or AVX2 (a forward-heavy model trades the memory for the time; calibration's streamed
    /// stages do not pack).
    pub fn with_panels(self, out_features: usize) -> LinearWeights {
        #[cfg(target_arch = "x86_64")]
        if self.panels.is_none() {
            let k = self.weight.len() / out_features.max(1);
            if let Some(p) = super::linear_packed::Panels::pack_best(&self.weight, out_features, k)
            {
                return LinearWeights {
                    panels: Some(Arc::new(p)),
                    ..self
                };
            }
        }
        let _ = out_features;
        self
    }

    /// These weights fake-quantized to `precision` (bias unchanged), NVFP4 against
    /// `tensor_amax` where its fused group shares one ([`crate::lower::fused`]).
    pub fn quantized(
        &self,
        l: &Linear,
        precision: LinearPrecision,
        tensor_amax: Option<f32>,
    ) -> LinearWeights {
        LinearWeights::new(
            Arc::new(precision.weights.fake_quantize_weights_against(
                &self.weight,
                l.out_features,
                l.in_features,
                tensor_amax,
            )),
            self.bias.clone(),
            precision.activations,
        )
    }

    /// These weights with their input activations quantized to `format` first.
    pub fn with_activations(self, format: Option<Format>) -> LinearWeights {
        LinearWeights {
            activations: format,
            ..self
        }
    }

    /// `x W^T + b` for a layer of `out_features` outputs, quantizing `x` first when the layer
    /// quantizes activations.
    pub fn apply(&self, out_features: usize, x: &Mat) -> Mat {
        let product = |x: &Mat| {
            #[cfg(target_arch = "x86_64")]
            if let Some(p) = self.panels.as_deref().filter(|p| p.runs(x.rows)) {
                return Mat::from_vec(x.rows, out_features, p.matmul_wt(&x.data, x.rows));
            }
            mat::matmul_wt(x, &self.weight, out_features)
        };
        let mut y = match self.activations {
            Some(f) => {
                let mut xq = x.clone();
                f.fake_quantize_activations(&mut xq.data, xq.rows, xq.cols);
                product(&xq)
            }
            None => product(x),
        };
        if let Some(b) = &self.bias {
            for row in y.data.chunks_mut(out_features) {
                row.iter_mut().zip(b.iter()).for_each(|(v, b)| *v += b);
            }
        }
        y
    }
}

/// The loaded parameters, by schedule slot (`None`: not loaded).
pub(super) struct Params {
    pub embedding: Option<Arc<Vec<f32>>>,
    pub norms: Vec<Option<Arc<Vec<f32>>>>,
    pub linears: Vec<Option<LinearWeights>>,
    /// Router weights `[experts, hidden]` by [`Schedule::moes`] slot.
    pub routers: Vec<Option<Arc<Vec<f32>>>>,
}

fn load_tensor(weights: &dyn WeightSource, name: &str, expected: &[usize]) -> Result<Tensor> {
    let t = weights.tensor(name)?;
    if t.shape != expected {
        return Err(Error::Layer {
            layer: name.to_string(),
            reason: format!(
                "tensor has shape {:?}, the graph expects {:?}",
                t.shape, expected
            ),
        });
    }
    Ok(t)
}

impl Params {
    /// Loads the parameters of the nodes `keep` selects, in `schedule`'s slots.
    pub fn load(
        graph: &Graph,
        schedule: &Schedule,
        weights: &dyn WeightSource,
        precision: &PrecisionMap,
        keep: &dyn Fn(&Node) -> bool,
    ) -> Result<Params> {
        // Tied embeddings: lm_head reads the embedding table; load it once.
        let mut tables: HashMap<String, Arc<Vec<f32>>> = HashMap::new();
        let mut table = |name: &str, shape: &[usize]| -> Result<Arc<Vec<f32>>> {
            if let Some(t) = tables.get(name) {
                return Ok(t.clone());
            }
            let t = Arc::new(load_tensor(weights, name, shape)?.data);
            tables.insert(name.to_string(), t.clone());
            Ok(t)
        };
        // NVFP4 members of an engine-fused group share its tensor scale (lower::fused).
        let shared_amax = crate::lower::fused::nvfp4_tensor_amax(graph, weights, &|n| {
            precision.get(n).map(|p| p.weights)
        })?;
        let mut p = Params {
            embedding: None,
            norms: vec![None; schedule.norms.len()],
            linears: vec![None; schedule.linears.len()],
            routers: vec![None; schedule.moes.len()],
        };
        let slots: HashMap<&str, usize> = (schedule.linears.iter().enumerate())
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        let routers: HashMap<&str, usize> = (schedule.moes.iter().enumerate())
            .map(|(i, m)| (m.name.as_str(), i))
            .collect();
        // RMSNorm and per-head norm nodes fill the schedule's norm slots in topological order.
        let mut norm = 0;
        for &id in graph.topo_order() {
            let node = graph.node(id);
            match &node.op {
                Op::Embedding {
                    tensor,
                    vocab,
                    hidden,
                } if keep(node) => p.embedding = Some(table(tensor, &[*vocab, *hidden])?),
                Op::RmsNorm { tensor, dim, .. }
                | Op::HeadNorm {
                    tensor,
                    head_dim: dim,
                    ..
                } => {
                    if keep(node) {
                        p.norms[norm] = Some(table(tensor, &[*dim])?);
                    }
                    norm += 1;
                }
                Op::Linear(l) if keep(node) => {
                    let slot = slots[node.name.as_str()];
                    let full = LinearWeights::new(
                        table(&l.weight, &[l.out_features, l.in_features])?,
                        match &l.bias {
                            Some(b) => Some(table(b, &[l.out_features])?),
                            None => None,
                        },
                        None,
                    );
                    p.linears[slot] = Some(match precision.get(&node.name) {
                        Some(&prec) => {
                            full.quantized(l, prec, shared_amax.get(&node.name).copied())
                        }
                        None => full,
                    });
                }
                Op::Router {
                    tensor,
                    hidden,
                    experts,
                    ..
                } if keep(node) => {
                    let slot = routers[node.name.as_str()];
                    p.routers[slot] = Some(table(tensor, &[*experts, *hidden])?);
                }
                _ => {}
            }
        }
        Ok(p)
    }
}
