//! The CPU reference backend: executes the IR graph in FP32 over a window of tokens (prefill
//! with causal attention), walking the nodes in topological order.
//!
//! Each linear layer runs with its weights fake-quantized (quantized to its format's byte
//! layout, then dequantized) as a [`PrecisionMap`] assigns, and, if asked, with its input
//! activations quantized dynamically. Layers absent from the map keep the checkpoint's FP32
//! weights: that is the full-precision reference every error is measured against.
//!
//! A [`Run`] can start at a decoder-block boundary with a given residual stream, stop at any
//! node, and swap one linear layer's weights; with [`CpuModel::load_where`] holding only the
//! parameters of the nodes it will execute, that is how calibration streams one block at a
//! time through memory.

pub mod kernels;
pub mod mat;

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::formats::Format;
use crate::ir::{Graph, Linear, Node, NodeId, Op};
use crate::model::{Tensor, WeightSource};

use crate::lower::{LinearPrecision, PrecisionMap};
pub use mat::Mat;

/// A linear layer's parameters as the CPU backend runs them.
#[derive(Debug, Clone)]
pub struct LinearWeights {
    /// Row-major `[out, in]`, already fake-quantized when the layer has a format.
    pub weight: Arc<Vec<f32>>,
    pub bias: Option<Arc<Vec<f32>>>,
    /// Activations are quantized to this format before the product.
    pub activations: Option<Format>,
}

impl LinearWeights {
    /// These weights fake-quantized to `precision` (bias unchanged).
    pub fn quantized(&self, l: &Linear, precision: LinearPrecision) -> LinearWeights {
        LinearWeights {
            weight: Arc::new(precision.weights.fake_quantize_weights(
                &self.weight,
                l.out_features,
                l.in_features,
            )),
            bias: self.bias.clone(),
            activations: precision.activations,
        }
    }

    /// `x W^T + b`, quantizing `x` first when the layer quantizes activations.
    pub fn apply(&self, l: &Linear, x: &Mat) -> Mat {
        let mut y = match self.activations {
            Some(f) => {
                let mut xq = x.clone();
                f.fake_quantize_activations(&mut xq.data, xq.rows, xq.cols);
                mat::matmul_wt(&xq, &self.weight, l.out_features)
            }
            None => mat::matmul_wt(x, &self.weight, l.out_features),
        };
        if let Some(b) = &self.bias {
            for row in y.data.chunks_mut(l.out_features) {
                row.iter_mut().zip(b.iter()).for_each(|(v, b)| *v += b);
            }
        }
        y
    }
}

/// Parameters of one node.
enum Params {
    /// Not loaded (or the op has none).
    None,
    Table(Arc<Vec<f32>>),
    Linear(LinearWeights),
}

/// Which part of the graph a forward pass executes.
#[derive(Default)]
pub struct Run<'a> {
    /// Start after this node, whose value is given (a block input, see [`Graph::block_input`]).
    pub from: Option<(NodeId, Mat)>,
    /// Stop after this node and return its value (default: the logits).
    pub until: Option<NodeId>,
    /// Run this linear layer with these weights instead of the loaded ones.
    pub replace: Option<(NodeId, &'a LinearWeights)>,
}

/// A graph with (some of) its weights in memory, ready to run on the CPU.
pub struct CpuModel {
    graph: Graph,
    params: Vec<Params>,
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

impl CpuModel {
    /// Loads every parameter the graph needs; linear layers named in `precision` are
    /// fake-quantized to their format.
    pub fn load(
        graph: &Graph,
        weights: &dyn WeightSource,
        precision: &PrecisionMap,
    ) -> Result<CpuModel> {
        Self::load_where(graph, weights, precision, &|_| true)
    }

    /// Loads the parameters of the nodes `keep` selects; running any other node with
    /// parameters is an error.
    pub fn load_where(
        graph: &Graph,
        weights: &dyn WeightSource,
        precision: &PrecisionMap,
        keep: &dyn Fn(&Node) -> bool,
    ) -> Result<CpuModel> {
        crate::lower::check_precision_targets(graph, precision)?;
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
        let mut params = Vec::with_capacity(graph.node_count());
        for &id in graph.topo_order() {
            let node = graph.node(id);
            let p = match &node.op {
                _ if !keep(node) => Params::None,
                Op::Embedding {
                    tensor,
                    vocab,
                    hidden,
                } => Params::Table(table(tensor, &[*vocab, *hidden])?),
                Op::RmsNorm { tensor, dim, .. } => Params::Table(table(tensor, &[*dim])?),
                Op::Linear(l) => {
                    let full = LinearWeights {
                        weight: table(&l.weight, &[l.out_features, l.in_features])?,
                        bias: match &l.bias {
                            Some(b) => Some(table(b, &[l.out_features])?),
                            None => None,
                        },
                        activations: None,
                    };
                    match precision.get(&node.name) {
                        Some(&p) => Params::Linear(full.quantized(l, p)),
                        None => Params::Linear(full),
                    }
                }
                _ => Params::None,
            };
            params.push(p);
        }
        Ok(CpuModel {
            graph: graph.clone(),
            params,
        })
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// The loaded parameters of a linear node.
    pub fn linear(&self, id: NodeId) -> Option<&LinearWeights> {
        match &self.params[id.index()] {
            Params::Linear(w) => Some(w),
            _ => None,
        }
    }

    /// Logits `[tokens, vocab]` of one window; token `i` sits at position `i`.
    pub fn forward(&self, tokens: &[u32]) -> Result<Mat> {
        self.execute(tokens, Run::default(), &mut |_, _, _| {})
    }

    /// Executes the part of the graph `run` selects over one window and returns the value of
    /// its last node. `observe(linear, input, output)` sees every linear layer that runs,
    /// with the input it received (before any activation quantization) and its output.
    pub fn execute(
        &self,
        tokens: &[u32],
        run: Run,
        observe: &mut dyn FnMut(NodeId, &Mat, &Mat),
    ) -> Result<Mat> {
        let g = &self.graph;
        let order = g.topo_order();
        let position = |id: NodeId| {
            order
                .iter()
                .position(|&n| n == id)
                .expect("node of this graph")
        };
        let until = run.until.unwrap_or_else(|| g.output());
        let mut values: Vec<Option<Mat>> = (0..g.node_count()).map(|_| None).collect();
        let mut pending: Vec<usize> = (0..g.node_count())
            .map(|i| g.consumer_count(NodeId::new(i)))
            .collect();
        let start = match run.from {
            Some((id, value)) => {
                values[id.index()] = Some(value);
                position(id) + 1
            }
            None => 0,
        };
        for &id in &order[start..=position(until)] {
            let inputs = g.inputs(id);
            let mut args = Vec::with_capacity(inputs.len());
            for src in &inputs {
                args.push(values[src.index()].as_ref().ok_or_else(|| Error::Layer {
                    layer: g.node(id).name.clone(),
                    reason: format!(
                        "operand `{}` was not computed by this run",
                        g.node(*src).name
                    ),
                })?);
            }
            let replaced = run.replace.filter(|(r, _)| *r == id).map(|(_, w)| w);
            let out = self.run_node(id, tokens, &args, replaced, observe)?;
            for src in inputs {
                pending[src.index()] -= 1;
                if pending[src.index()] == 0 {
                    values[src.index()] = None;
                }
            }
            values[id.index()] = Some(out);
        }
        Ok(values[until.index()].take().expect("the last node ran"))
    }

    fn run_node(
        &self,
        id: NodeId,
        tokens: &[u32],
        args: &[&Mat],
        replaced: Option<&LinearWeights>,
        observe: &mut dyn FnMut(NodeId, &Mat, &Mat),
    ) -> Result<Mat> {
        let node = self.graph.node(id);
        let not_loaded = || Error::Layer {
            layer: node.name.clone(),
            reason: "its parameters were not loaded into this model".into(),
        };
        Ok(match (&node.op, &self.params[id.index()]) {
            (Op::Embedding { vocab, hidden, .. }, Params::Table(table)) => {
                let mut x = Mat::zeros(tokens.len(), *hidden);
                for (row, &tok) in x.data.chunks_mut(*hidden).zip(tokens) {
                    let t = tok as usize;
                    if t >= *vocab {
                        return Err(Error::invalid(
                            "token id",
                            format!("{t} is outside the vocabulary of {vocab}"),
                        ));
                    }
                    row.copy_from_slice(&table[t * hidden..(t + 1) * hidden]);
                }
                x
            }
            (Op::RmsNorm { eps, .. }, Params::Table(w)) => kernels::rms_norm(args[0], w, *eps),
            (Op::Linear(l), loaded) => {
                let weights = match (replaced, loaded) {
                    (Some(w), _) => w,
                    (None, Params::Linear(w)) => w,
                    _ => return Err(not_loaded()),
                };
                let y = weights.apply(l, args[0]);
                observe(id, args[0], &y);
                y
            }
            (
                Op::Rope {
                    heads,
                    head_dim,
                    theta,
                },
                _,
            ) => {
                let mut x = args[0].clone();
                kernels::rope(&mut x, *heads, *head_dim, *theta);
                x
            }
            (
                Op::Attention {
                    heads,
                    kv_heads,
                    head_dim,
                },
                _,
            ) => kernels::causal_attention(args[0], args[1], args[2], *heads, *kv_heads, *head_dim),
            (Op::SiluMul { .. }, _) => kernels::silu_mul(args[0].clone(), args[1]),
            (Op::Add { .. }, _) => kernels::add(args[0].clone(), args[1]),
            (Op::Embedding { .. } | Op::RmsNorm { .. }, _) => return Err(not_loaded()),
        })
    }
}
