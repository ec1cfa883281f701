//! The calibration forwards on the generated kernels ([`KernelStages`]): a stage's steps of the
//! full-precision schedule (FP32 weights and activations, the reference the passes measure
//! against) launched on any [`Launcher`] (the cuda backend on a GPU, the emulator on the CPU)
//! with the one argument binding every backend uses ([`launch_args`](crate::runtime::launch::launch_args), [`linear_args`]).
//!
//! Per stage, its FP32 weights are loaded on the host (the passes quantize them and measure
//! there) and uploaded once; one sequence's activation buffers and KV cache serve every
//! stage; each stream of a run is one prefill pass over its rows at positions from 0. Where the plan's kernels differ from what calibration needs:
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
    Act, ActDtype, KernelSpec, LinearPrecision, LinearShape, PrecisionMap, Schedule, Step,
    WeightFormat,
};
use crate::model::WeightSource;
use crate::runtime::cpu::{CpuModel, LinearWeights, Mat};
use crate::runtime::cuda::{CompilerOptions, Device, KernelCache};
use crate::runtime::emu::{EmuKernels, EmuOptions};
use crate::runtime::exec::{ExecutablePlan, PackedLinear, PackedScales};
use crate::runtime::launch::{
    launch_on, linear_args, run_linear_on, Launcher, LinearBuffers, LinearInput, ParamBuffers,
    SequenceBuffers,
};

/// The FP32 schedule calibration runs ([`PrecisionMap::new`]: every linear layer in FP32).
/// MoE models are refused: the kernel stages have no observer inside the grouped expert
/// kernels (each expert's routed rows), which per-expert eps needs.
pub fn reference_schedule(graph: &Graph) -> Result<Schedule> {
    let schedule = Schedule::build(graph, &PrecisionMap::new())?;
    match schedule.moes.first() {
        Some(m) => Err(crate::error::Error::Layer {
            layer: m.name.clone(),
            reason: "calibration through the generated kernels does not observe the experts' \
                     routed rows yet; calibrate mixture-of-experts models with --backend cpu"
                .into(),
        }),
        None => Ok(schedule),
    }
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
    schedule: Schedule,
    /// The graph node of each schedule linear slot.
    nodes: Vec<Option<NodeId>>,
    /// One sequence's buffers, shared by every stage: a stage's steps write their own layer's
    /// KV cache only, and each stream starts from the residual stream it is given.
    seq: SequenceBuffers<L::Buf>,
    /// `[max_seq, vocab]`, every row's logits, allocated when the head first loads.
    logits: Option<L::Buf>,
}

impl<L: Launcher> KernelStages<L> {
    /// `graph`'s FP32 schedule on `launcher`, for streams of up to `max_seq` tokens.
    pub fn new(launcher: L, name: &'static str, graph: &Graph, max_seq: usize) -> Result<Self> {
        let schedule = reference_schedule(graph)?;
        let nodes = schedule
            .linears
            .iter()
            .map(|s| graph.find(&s.name))
            .collect();
        let seq = SequenceBuffers::for_schedule(&launcher, &schedule, max_seq)?;
        Ok(KernelStages {
            launcher,
            name,
            max_seq,
            schedule,
            nodes,
            seq,
            logits: None,
        })
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
        KernelStages::new(launcher, "emu", graph, max_seq)
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
        let stages = KernelStages::new(dev, "cuda", graph, max_seq)?;
        stages
            .launcher
            .allow_attention_shared_memory(&stages.schedule, max_seq)?;
        Ok(stages)
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

/// A linear layer's packed weights in one format on the launcher.
struct Variant<B> {
    slot: usize,
    shape: LinearShape,
    buffers: LinearBuffers<B>,
}

struct KernelStage<'s, L: Launcher> {
    l: &'s L,
    max_seq: usize,
    schedule: &'s Schedule,
    nodes: &'s [Option<NodeId>],
    seq: &'s mut SequenceBuffers<L::Buf>,
    /// Set for the head.
    logits: Option<&'s L::Buf>,
    /// The stage's FP32 parameters on the host.
    host: CpuModel,
    params: ParamBuffers<L::Buf>,
    steps: Range<usize>,
    /// Layers in other formats (KL variants, the eps pass's products), packed once for the
    /// stage.
    variants: BTreeMap<(NodeId, Format), Variant<L::Buf>>,
}

impl<'s, L: Launcher> KernelStage<'s, L> {
    fn load(
        stages: &'s mut KernelStages<L>,
        graph: &'s Graph,
        weights: &dyn WeightSource,
        stage: usize,
    ) -> Result<Self> {
        let KernelStages {
            launcher: l,
            max_seq,
            schedule,
            nodes,
            seq,
            logits,
            ..
        } = stages;
        let host = load_stage(graph, weights, stage)?;
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
            .zip(nodes.iter())
            .map(|(slot, node)| match node.and_then(|id| host.linear(id)) {
                Some(w) => PackedLinear::pack(
                    WeightFormat::F32,
                    &w.weight,
                    slot.shape.n,
                    slot.shape.k,
                    w.bias.as_deref().cloned(),
                    None,
                ),
                None => empty(),
            })
            .collect();
        let d = &schedule.dims;
        let (rope_cos, rope_sin) =
            crate::runtime::cpu::kernels::rope_tables(*max_seq, d.head_dim, &d.rope);
        let plan = ExecutablePlan {
            schedule: schedule.clone(),
            max_seq: *max_seq,
            embedding: Arc::new(Vec::new()),
            norms: (0..schedule.norms.len())
                .map(|i| host.norm(i).map(<[f32]>::to_vec).unwrap_or_default())
                .collect(),
            linears,
            rope_cos,
            rope_sin,
            routers: Vec::new(),
        };
        if head && logits.is_none() {
            *logits = Some(l.zeros(*max_seq * d.vocab * ActDtype::F32.bytes())?);
        }
        Ok(KernelStage {
            params: ParamBuffers::upload(&*l, &plan)?,
            l,
            max_seq: *max_seq,
            schedule,
            nodes,
            seq,
            logits: if head { logits.as_ref() } else { None },
            host,
            steps: start..end,
            variants: BTreeMap::new(),
        })
    }

    /// Linear layer `id` in `format`, packed and uploaded on first use.
    fn variant(&mut self, key: (NodeId, Format)) -> Result<&Variant<L::Buf>> {
        if !self.variants.contains_key(&key) {
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
                // Calibration measures each layer alone (lower::fused).
                None,
            );
            let buffers = LinearBuffers::upload(self.l, &packed)?;
            self.variants.insert(
                key,
                Variant {
                    slot,
                    shape,
                    buffers,
                },
            );
        }
        Ok(&self.variants[&key])
    }

    fn read(&self, buf: &L::Buf, values: usize) -> Result<Vec<f32>> {
        Ok(ActDtype::F32.decode(&self.l.read(buf, values * 4)?))
    }

    /// The buffer activation `a` lives in (the head's logits: every row's).
    fn buf(&self, a: Act) -> &L::Buf {
        match (a, self.logits) {
            (Act::Logits, Some(logits)) => logits,
            _ => &self.seq.acts[a as usize],
        }
    }

    /// One linear step over `m` rows (in `variant`'s format where it is this layer), observed
    /// when asked.
    fn linear_step(
        &self,
        slot: usize,
        (src, dst): (Act, Act),
        m: usize,
        variant: Option<&Variant<L::Buf>>,
        observe: &mut Option<Observer<'_>>,
    ) -> Result<()> {
        let (shape, w) = match variant {
            Some(v) if v.slot == slot => (v.shape, &v.buffers),
            _ => (
                self.schedule.linears[slot].shape,
                &self.params.linears[slot],
            ),
        };
        let (x, y) = (self.buf(src), self.buf(dst));
        let (spec, entry) = shape.kernel_for_rows(m);
        let launch = |y: &L::Buf| {
            // SAFETY: `linear_args` is the linear kernels' signature; x and y hold `m` rows of
            // the layer's input and output width (buffers of `max_seq` rows).
            unsafe {
                self.l.launch(
                    &spec,
                    &entry,
                    m,
                    self.max_seq,
                    &linear_args(w, LinearInput::Act(x), y, m),
                )
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
        &self,
        m: usize,
        variant: Option<&Variant<L::Buf>>,
        observe: &mut Option<Observer<'_>>,
    ) -> Result<()> {
        for index in self.steps.clone() {
            let step = match self.schedule.steps[index] {
                Step::Linear {
                    linear, src, dst, ..
                } => {
                    self.linear_step(linear, (src, dst), m, variant, observe)?;
                    continue;
                }
                // Calibration needs every row's logits.
                Step::RmsNorm {
                    norm,
                    src,
                    dst,
                    quant,
                    ..
                } => Step::RmsNorm {
                    norm,
                    src,
                    dst,
                    last_row: false,
                    quant,
                },
                other => other,
            };
            for launch in self.schedule.launches(&step, m, false) {
                // SAFETY: the buffers were allocated for this schedule and `max_seq` rows.
                unsafe {
                    launch_on(
                        self.l,
                        self.schedule,
                        &self.params,
                        self.seq,
                        &launch,
                        self.max_seq,
                    )?
                };
            }
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
        let l = self.l;
        let v = self.variant((id, format))?;
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
        let y = run_linear_on(l, v.shape, &v.buffers, input, x.rows, &zeros)?;
        Ok(Mat::from_vec(x.rows, v.shape.n, y))
    }

    fn run(
        &mut self,
        tokens: &[u32],
        x: Mat,
        variant: Option<(NodeId, LinearPrecision)>,
        mut observe: Option<Observer<'_>>,
    ) -> Result<Mat> {
        if let Some(p) = variant.filter(|(_, p)| p.activations.is_some()) {
            return Err(Error::Layer {
                layer: self.nodes.iter().position(|n| *n == Some(p.0)).map_or_else(
                    || format!("{:?}", p.0),
                    |s| self.schedule.linears[s].name.clone(),
                ),
                reason: format!(
                    "a {} KL variant: the kernel stages run weight-only variants \
                     (calibrate --kl-activations with --backend cpu)",
                    p.1
                ),
            });
        }
        let variant = variant.map(|(id, p)| (id, p.weights));
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
            self.variant(key)?;
        }
        let (out, cols) = match self.logits {
            Some(_) => (Act::Logits, self.schedule.dims.vocab),
            None => (Act::X, hidden),
        };
        let l = self.l;
        l.write(&mut self.seq.pos, &0i32.to_le_bytes())?;
        let mut data = Vec::with_capacity(x.rows * cols);
        for stream in x.data.chunks(m * hidden) {
            l.write(
                &mut self.seq.acts[Act::X as usize],
                &ActDtype::F32.encode(stream),
            )?;
            let v = variant.map(|key| &self.variants[&key]);
            self.run_stream(m, v, &mut observe)?;
            data.extend(self.read(self.buf(out), m * cols)?);
        }
        Ok(Mat::from_vec(x.rows, cols, data))
    }
}
