//! Where the calibration passes run their forward passes. Both passes walk the model one stage
//! at a time (a decoder block, or the head: final norm and lm_head) and ask the stage for three
//! things: run from a residual stream to the next (the head: to every position's logits), run
//! with one linear layer in a format instead of full precision (the KL pass's variants), and
//! show each linear layer's input and output (the eps pass). [`StageForwards`] is that
//! interface; the CPU interpreter implements it here ([`CpuForwards`]), the generated kernels
//! on any [`Launcher`](crate::runtime::launch::Launcher) in [`super::kernel_stages`] (the emu
//! and cuda backends), which also run the eps pass's quantized products
//! ([`Stage::quantized_product`]). What the passes compute from those (Gram matrices and
//! traces on the CPU, sums of squares, KL sums) is the same host code for every backend.

use crate::error::Result;
use crate::formats::Format;
use crate::ir::{Graph, NodeId, Op};
use crate::lower::LinearPrecision;
use crate::model::WeightSource;
use crate::runtime::cpu::{CpuModel, LinearWeights, Mat, Run};

use super::load_stage;

/// Sees a linear layer's input and output (before a fused residual add).
pub type Observer<'o> = &'o mut dyn FnMut(NodeId, &Mat, &Mat);

/// A backend that runs the calibration passes' forwards, one stage at a time.
pub trait StageForwards {
    /// `cpu`, `emu` or `cuda`.
    fn name(&self) -> &'static str;
    /// Stage `stage` of `graph` with its full-precision weights loaded (the embedding
    /// excluded: the passes embed the windows on the host).
    fn load<'s>(
        &'s mut self,
        graph: &'s Graph,
        weights: &dyn WeightSource,
        stage: usize,
    ) -> Result<Box<dyn Stage + 's>>;
}

/// One loaded stage.
pub trait Stage {
    /// The full-precision weights of one of the stage's linear layers (on the host: the passes
    /// quantize them and measure the errors there).
    fn linear(&self, id: NodeId) -> &LinearWeights;
    /// Runs the stage from its input `x` (one stream of `tokens.len()` rows, or several
    /// stacked: each is its own sequence at positions `0..tokens.len()`) to the block's output
    /// residual stream, or for the head to the logits of every row. `variant`: that linear
    /// layer runs in that precision (weights quantized, and its input too where the precision
    /// quantizes activations). `observe` sees every linear layer's input and output.
    fn run(
        &mut self,
        tokens: &[u32],
        x: Mat,
        variant: Option<(NodeId, LinearPrecision)>,
        observe: Option<Observer<'_>>,
    ) -> Result<Mat>;

    /// Whether [`Stage::quantized_product`] runs the eps pass's products on this backend (the
    /// kernel backends); otherwise the pass multiplies its own quantized copies on the host.
    fn computes_products(&self) -> bool {
        false
    }

    /// `x Q_f(W)^T + b` of linear layer `id` in `format` (with `x` quantized to `format` first
    /// when `quantize_activations`: the W+A product), where [`Stage::computes_products`].
    fn quantized_product(
        &mut self,
        id: NodeId,
        format: Format,
        x: &Mat,
        quantize_activations: bool,
    ) -> Result<Mat> {
        let _ = (id, format, x, quantize_activations);
        Err(crate::error::Error::invalid(
            "calibration stage",
            "this backend leaves the eps products to the host",
        ))
    }
}

/// The calibration forwards on the CPU interpreter ([`CpuModel`]), in FP32.
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuForwards;

impl StageForwards for CpuForwards {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn load<'s>(
        &'s mut self,
        graph: &'s Graph,
        weights: &dyn WeightSource,
        stage: usize,
    ) -> Result<Box<dyn Stage + 's>> {
        let model = load_stage(graph, weights, stage)?;
        Ok(Box::new(CpuStage {
            graph,
            stage,
            model,
            variant: None,
        }))
    }
}

struct CpuStage<'g> {
    graph: &'g Graph,
    stage: usize,
    model: CpuModel,
    /// The quantized weights of the last variant run (the KL pass runs a variant on every
    /// window in a row).
    variant: Option<((NodeId, LinearPrecision), LinearWeights)>,
}

impl Stage for CpuStage<'_> {
    fn linear(&self, id: NodeId) -> &LinearWeights {
        self.model
            .linear(id)
            .expect("the passes ask only for the stage's own linear layers")
    }

    fn run(
        &mut self,
        tokens: &[u32],
        x: Mat,
        variant: Option<(NodeId, LinearPrecision)>,
        observe: Option<Observer<'_>>,
    ) -> Result<Mat> {
        if let Some(key @ (id, precision)) = variant {
            if self.variant.as_ref().map(|v| v.0) != Some(key) {
                let Op::Linear(l) = &self.graph.node(id).op else {
                    unreachable!("variants are linear layers")
                };
                let q = self.linear(id).quantized(l, precision, None);
                self.variant = Some((key, q));
            }
        }
        let g = self.graph;
        let run = Run {
            from: Some((
                g.block_input(self.stage).expect("every stage has an input"),
                x,
            )),
            until: g.block_output(self.stage),
            replace: variant.and_then(|_| self.variant.as_ref().map(|(k, w)| (k.0, w))),
        };
        match observe {
            Some(o) => self.model.execute(tokens, run, o),
            None => self.model.execute(tokens, run, &mut |_, _, _| {}),
        }
    }
}
