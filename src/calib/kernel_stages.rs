//! The calibration forwards on the generated kernels ([`KernelStages`]): a stage's steps of the
//! full-precision schedule (FP32 weights and activations, the reference the passes measure
//! against) launched on any [`Launcher`] (the cuda backend on a GPU, the emulator on the CPU)
//! with the one argument binding every backend uses ([`step_args`], [`linear_args`]).
//!
//! Per stage, its FP32 weights are loaded on the host (the passes quantize them and measure
//! there) and uploaded once; each stream of a run is one prefill pass over its rows at
//! positions from 0. Where the plan's kernels differ from what calibration needs:
//! - the head runs the final norm and lm_head on every row into a logits buffer of
//!   `max_seq` rows (a plan keeps the last row's);
//! - a variant launches the layer's kernel *in that format*, on its packed bytes (the KL pass
//!   measures the kernels a plan would run, not FP32 weights that decode the same values);
//! - an observed linear layer's input and output are read back; for an accumulating layer
//!   (o_proj, down_proj) its kernel runs a second time into a zeroed buffer, so the output is
//!   the layer's own, not the residual sum minus the residual;
//! - the eps pass's products (`x Q_f(W)^T`, and the W+A `Q_f(x) Q_f(W)^T` with `x` quantized on
//!   the host by the CPU reference's own quantizer, as the kernels cannot yet) run the layer's
//!   kernel in its format on packed bytes kept for the stage ([`Stage::quantized_product`]).

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::Arc;

use super::forwards::{Observer, Stage, StageForwards};
use super::load_stage;
use crate::error::{Error, Result};
use crate::formats::Format;
use crate::ir::{Graph, NodeId};
use crate::lower::{
    Act, ActDtype, KernelSpec, LinearShape, PrecisionMap, Schedule, Step, WeightFormat,
};
use crate::model::WeightSource;
use crate::runtime::cpu::{CpuModel, LinearWeights, Mat};
use crate::runtime::cuda::{CompilerOptions, Device, KernelCache};
use crate::runtime::emu::{EmuKernels, EmuOptions};
use crate::runtime::exec::{ExecutablePlan, PackedLinear, PackedScales};
use crate::runtime::launch::{
    linear_args, run_linear_on, step_args, Launcher, LinearBuffers, ParamBuffers, SequenceBuffers,
};

/// The FP32 schedule calibration runs ([`PrecisionMap::new`]: every linear layer in FP32).
pub fn reference_schedule(graph: &Graph) -> Result<Schedule> {
    Schedule::build(graph, &PrecisionMap::new())
}

/// Every kernel [`KernelStages`] launches for `graph` with variants in `formats`: those of the
/// FP32 schedule, and each linear layer's GEMV and GEMM in each format.
pub fn kernels(graph: &Graph, formats: &[Format]) -> Result<Vec<KernelSpec>> {
    let schedule = reference_schedule(graph)?;
    let mut set: BTreeSet<KernelSpec> = schedule.kernels().into_iter().collect();
    for slot in &schedule.linears {
        for &f in formats {
            let shape = variant_shape(slot.shape, f);
            set.insert(KernelSpec::Gemv(shape));
            set.insert(KernelSpec::Gemm(shape));
        }
    }
    Ok(set.into_iter().collect())
}

fn variant_shape(shape: LinearShape, format: Format) -> LinearShape {
    LinearShape {
        format: WeightFormat::of(Some(format)),
        ..shape
    }
}

/// The calibration forwards on a launcher that has [`kernels`] loaded.
pub struct KernelStages<L: Launcher> {
    launcher: L,
    name: &'static str,
    /// The longest stream a run may get (sizes the activation buffers and the KV cache).
    max_seq: usize,
}

impl<L: Launcher> KernelStages<L> {
    pub fn new(launcher: L, name: &'static str, max_seq: usize) -> Self {
        KernelStages {
            launcher,
            name,
            max_seq,
        }
    }
}

impl KernelStages<EmuKernels> {
    /// The emulator with [`kernels`] built (through its cache) for `graph` and `formats`.
    pub fn emu(
        graph: &Graph,
        formats: &[Format],
        max_seq: usize,
        opts: &EmuOptions,
    ) -> Result<Self> {
        let launcher = EmuKernels::load(&kernels(graph, formats)?, opts)?;
        Ok(KernelStages::new(launcher, "emu", max_seq))
    }
}

impl KernelStages<Device> {
    /// CUDA device `ordinal` with [`kernels`] compiled (through the kernel cache) and loaded.
    pub fn cuda(graph: &Graph, formats: &[Format], max_seq: usize, ordinal: usize) -> Result<Self> {
        let mut dev = Device::open(ordinal)?;
        let opts = CompilerOptions {
            cache_dir: Some(KernelCache::default_dir()),
            ..CompilerOptions::default()
        };
        dev.load_kernels(&kernels(graph, formats)?, opts)?;
        dev.allow_attention_shared_memory(&reference_schedule(graph)?, max_seq)?;
        Ok(KernelStages::new(dev, "cuda", max_seq))
    }
}

impl<L: Launcher> StageForwards for KernelStages<L> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn load<'s>(
        &'s mut self,
        graph: &'s Graph,
        weights: &dyn WeightSource,
        stage: usize,
    ) -> Result<Box<dyn Stage + 's>> {
        Ok(Box::new(KernelStage::load(self, graph, weights, stage)?))
    }
}

/// A variant's packed weights on the launcher.
struct Variant<B> {
    key: (NodeId, Format),
    slot: usize,
    shape: LinearShape,
    buffers: LinearBuffers<B>,
}

struct KernelStage<'s, L: Launcher> {
    l: &'s L,
    max_seq: usize,
    schedule: Schedule,
    /// The stage's FP32 parameters on the host.
    host: CpuModel,
    /// The graph node of each schedule linear slot.
    nodes: Vec<Option<NodeId>>,
    params: ParamBuffers<L::Buf>,
    seq: SequenceBuffers<L::Buf>,
    /// `[max_seq, vocab]` for the head.
    logits: Option<L::Buf>,
    steps: Range<usize>,
    head: bool,
    variant: Option<Variant<L::Buf>>,
    /// The eps pass's quantized layers, kept for every window of the stage.
    products: BTreeMap<(NodeId, Format), Variant<L::Buf>>,
}

impl<'s, L: Launcher> KernelStage<'s, L> {
    fn load(
        stages: &'s KernelStages<L>,
        graph: &'s Graph,
        weights: &dyn WeightSource,
        stage: usize,
    ) -> Result<Self> {
        let l = &stages.launcher;
        let host = load_stage(graph, weights, stage)?;
        let schedule = reference_schedule(graph)?;
        let nodes: Vec<Option<NodeId>> = schedule
            .linears
            .iter()
            .map(|s| graph.find(&s.name))
            .collect();
        let boundary = |id: Option<NodeId>| id.and_then(|id| schedule.boundaries.get(&id).copied());
        let start = boundary(graph.block_input(stage)).ok_or_else(|| {
            Error::invalid(
                "calibration stage",
                format!("stage {stage} has no input boundary"),
            )
        })?;
        let head = stage == graph.spec().num_layers;
        // The head ends before the argmax.
        let end = boundary(graph.block_output(stage)).unwrap_or(schedule.steps.len() - 1);
        let empty = || PackedLinear {
            format: WeightFormat::F32,
            codes: Vec::new(),
            scales: PackedScales::None,
            global: 1.0,
            bias: None,
        };
        let linears = schedule
            .linears
            .iter()
            .zip(&nodes)
            .map(|(slot, node)| match node.and_then(|id| host.linear(id)) {
                Some(w) => PackedLinear::pack(
                    WeightFormat::F32,
                    &w.weight,
                    slot.shape.n,
                    slot.shape.k,
                    w.bias.as_deref().cloned(),
                ),
                None => empty(),
            })
            .collect();
        let d = &schedule.dims;
        let (rope_cos, rope_sin) =
            crate::runtime::cpu::kernels::rope_tables(stages.max_seq, d.head_dim, &d.rope);
        let plan = ExecutablePlan {
            schedule: schedule.clone(),
            max_seq: stages.max_seq,
            embedding: Arc::new(Vec::new()),
            norms: (0..schedule.norms.len())
                .map(|i| host.norm(i).map(<[f32]>::to_vec).unwrap_or_default())
                .collect(),
            linears,
            rope_cos,
            rope_sin,
        };
        let logits = if head {
            Some(l.zeros(stages.max_seq * d.vocab * ActDtype::F32.bytes())?)
        } else {
            None
        };
        Ok(KernelStage {
            l,
            max_seq: stages.max_seq,
            params: ParamBuffers::upload(l, &plan)?,
            seq: SequenceBuffers::zeros(l, &plan)?,
            schedule,
            host,
            nodes,
            logits,
            steps: start..end,
            head,
            variant: None,
            products: BTreeMap::new(),
        })
    }

    /// Linear layer `id`'s weights packed in `format` and uploaded.
    fn pack(&self, key: (NodeId, Format)) -> Result<Variant<L::Buf>> {
        let (id, format) = key;
        let slot = self
            .nodes
            .iter()
            .position(|&n| n == Some(id))
            .expect("variants are schedule linear slots");
        let shape = variant_shape(self.schedule.linears[slot].shape, format);
        let w = self.linear(id);
        let packed = PackedLinear::pack(
            shape.format,
            &w.weight,
            shape.n,
            shape.k,
            w.bias.as_deref().cloned(),
        );
        Ok(Variant {
            key,
            slot,
            shape,
            buffers: LinearBuffers::upload(self.l, &packed)?,
        })
    }

    /// Uploads the packed weights of variant `key` unless they are the current ones.
    fn set_variant(&mut self, key: (NodeId, Format)) -> Result<()> {
        if self.variant.as_ref().map(|v| v.key) != Some(key) {
            self.variant = Some(self.pack(key)?);
        }
        Ok(())
    }

    fn read(&self, buf: &L::Buf, values: usize) -> Result<Vec<f32>> {
        Ok(ActDtype::F32.decode(&self.l.read(buf, values * 4)?))
    }

    /// One linear step over `m` rows (the variant's kernel and weights where it is the variant),
    /// observed when asked.
    fn linear_step(
        &self,
        slot: usize,
        src: Act,
        dst: Act,
        m: usize,
        use_variant: bool,
        observe: &mut Option<Observer<'_>>,
    ) -> Result<()> {
        let (shape, w) = match &self.variant {
            Some(v) if use_variant && v.slot == slot => (v.shape, &v.buffers),
            _ => (
                self.schedule.linears[slot].shape,
                &self.params.linears[slot],
            ),
        };
        let x = &self.seq.acts[src as usize];
        let y = match (dst, &self.logits) {
            (Act::Logits, Some(logits)) => logits,
            _ => &self.seq.acts[dst as usize],
        };
        let (spec, entry) = shape.kernel_for_rows(m);
        let launch = |y: &L::Buf| {
            // SAFETY: `linear_args` is the linear kernels' signature; x and y hold `m` rows of
            // the layer's input and output width (buffers of `max_seq` rows).
            unsafe {
                self.l
                    .launch(&spec, &entry, m, self.max_seq, &linear_args(w, x, y, m))
            }
        };
        let Some(observe) = observe else {
            return launch(y);
        };
        let input = Mat::from_vec(m, shape.k, self.read(x, m * shape.k)?);
        let output = if shape.accumulate {
            let own = self.l.zeros(m * shape.n * 4)?;
            launch(&own)?;
            launch(y)?;
            self.read(&own, m * shape.n)?
        } else {
            launch(y)?;
            self.read(y, m * shape.n)?
        };
        let id = self.nodes[slot].expect("schedule slots name graph nodes");
        observe(id, &input, &Mat::from_vec(m, shape.n, output));
        Ok(())
    }

    /// The stage's steps over one stream of `m` rows already in [`Act::X`].
    fn run_stream(
        &mut self,
        m: usize,
        use_variant: bool,
        observe: &mut Option<Observer<'_>>,
    ) -> Result<()> {
        self.l.write(&mut self.seq.pos, &0i32.to_le_bytes())?;
        for index in self.steps.clone() {
            let step = match self.schedule.steps[index] {
                Step::Linear { linear, src, dst } => {
                    self.linear_step(linear, src, dst, m, use_variant, observe)?;
                    continue;
                }
                // Calibration needs every row's logits.
                Step::RmsNorm { norm, src, dst, .. } => Step::RmsNorm {
                    norm,
                    src,
                    dst,
                    last_row: false,
                },
                other => other,
            };
            let (spec, entry) = self.schedule.launch_of(&step, m);
            let args = step_args(&self.schedule, &self.params, &self.seq, &step, m, false);
            // SAFETY: `Step::params` lists the kernel's signature in order; the buffers were
            // allocated for this schedule and `max_seq` rows.
            unsafe {
                self.l
                    .launch(&spec, &entry, step.rows(m), self.max_seq, &args)?
            };
        }
        Ok(())
    }
}

impl<L: Launcher> Stage for KernelStage<'_, L> {
    fn linear(&self, id: NodeId) -> &LinearWeights {
        self.host
            .linear(id)
            .expect("the passes ask only for the stage's own linear layers")
    }

    fn computes_products(&self) -> bool {
        true
    }

    fn quantized_product(
        &mut self,
        id: NodeId,
        format: Format,
        x: &Mat,
        quantize_activations: bool,
    ) -> Result<Mat> {
        let key = (id, format);
        if !self.products.contains_key(&key) {
            let packed = self.pack(key)?;
            self.products.insert(key, packed);
        }
        let v = &self.products[&key];
        let quantized;
        let input = if quantize_activations {
            let mut q = x.data.clone();
            format.fake_quantize_activations(&mut q, x.rows, x.cols);
            quantized = q;
            &quantized
        } else {
            &x.data
        };
        let zeros = vec![0f32; x.rows * v.shape.n];
        let y = run_linear_on(self.l, v.shape, &v.buffers, input, x.rows, &zeros)?;
        Ok(Mat::from_vec(x.rows, v.shape.n, y))
    }

    fn run(
        &mut self,
        tokens: &[u32],
        x: Mat,
        variant: Option<(NodeId, Format)>,
        mut observe: Option<Observer<'_>>,
    ) -> Result<Mat> {
        let m = tokens.len();
        let hidden = self.schedule.dims.hidden;
        if m == 0 || m > self.max_seq || !x.rows.is_multiple_of(m) || x.cols != hidden {
            return Err(Error::invalid(
                "calibration stage",
                format!(
                    "{} x {} input for streams of {m} tokens (1..={} tokens of width {hidden})",
                    x.rows, x.cols, self.max_seq
                ),
            ));
        }
        if let Some(key) = variant {
            self.set_variant(key)?;
        }
        let (out, cols) = if self.head {
            (Act::Logits, self.schedule.dims.vocab)
        } else {
            (Act::X, hidden)
        };
        let mut data = Vec::with_capacity(x.rows / m * m * cols);
        for stream in x.data.chunks(m * hidden) {
            self.l.write(
                &mut self.seq.acts[Act::X as usize],
                &ActDtype::F32.encode(stream),
            )?;
            self.run_stream(m, variant.is_some(), &mut observe)?;
            let buf = match (&self.logits, out) {
                (Some(logits), Act::Logits) => logits,
                _ => &self.seq.acts[out as usize],
            };
            data.extend(self.read(buf, m * cols)?);
        }
        Ok(Mat::from_vec(data.len() / cols, cols, data))
    }
}
