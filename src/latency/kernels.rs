//! What fpx's own kernels cost: the latency of a plan computed from its schedule.
//!
//! For every step of a decode pass ([`Schedule::work`]: the kernel's DRAM bytes, FLOPs,
//! decode instructions and instruction path), the time is
//! `max(bytes / bandwidth, compute) + launch overhead`, where compute is, on the kernel's
//! instruction path, `(FMAs + decode instructions) / SIMT issue rate` for FP32-FMA kernels
//! (the issue rate is half the FP32 FLOP rate: one FMA per lane per cycle), or
//! `flops / tensor peak` of the path's MMA type. A step of `batch` sequences decoding one token
//! each runs every kernel once over `batch` rows; attention reads each sequence's KV cache of
//! `context` positions.
//!
//! Tensor parallelism over `N` GPUs, as vLLM shards a decoder: column-parallel layers (q, k,
//! v, gate, up, lm_head) split their output rows, row-parallel ones (o, down) their input
//! columns, attention splits its heads and SiLU-gate its FFN columns; norms, embedding and
//! argmax are not split. Each block ends its attention and its MLP with a ring all-reduce of
//! the hidden state: `2 (N-1)/N x batch x hidden x activation bytes / link bandwidth + link latency`
//! ([`super::roofline::Interconnect`]). Times are per GPU (all GPUs run in lockstep).
//!
//! The datasheet [`Roofline`](super::Roofline) is kept beside it as the hardware's bound (the
//! bytes at peak bandwidth or the FLOPs at the format's tensor peak, whichever is larger): the
//! report of a plan shows both what fpx's kernels cost and what the chip allows.

use serde::Serialize;

use crate::error::{Error, Result};
use crate::formats::Format;
use crate::ir::{Graph, LinearKind};
use crate::lower::moe::expert_work;
use crate::lower::{
    linear_work, ActDtype, Arch, InstructionPath, KernelWork, LinearPrecision, LinearShape,
    MoeSlot, PrecisionMap, Schedule, Step, WeightFormat,
};

use super::roofline::{Gpu, GpuSpec};
use super::{LatencyModel, LatencySource, LayerShape};

/// The kernel cost model of one GPU for one model, at one batch size and context length.
#[derive(Debug, Clone)]
pub struct KernelCost {
    pub gpu: Gpu,
    pub spec: GpuSpec,
    pub arch: Arch,
    /// Sequences decoding one token each per step.
    pub batch: usize,
    /// Positions each sequence attends to.
    pub context: usize,
    /// GPUs the model is sharded over (1: no tensor parallelism).
    pub tensor_parallel: usize,
    /// The model's schedule with every layer in FP32 (a layer's format is substituted per
    /// question; shapes, biases and epilogues come from here).
    schedule: Schedule,
    /// The model, to schedule a plan's quantizing steps ([`KernelCost::explain`] and the
    /// input quantization a layer's precision adds).
    graph: Graph,
}

/// One launch of a step, explained.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KernelRow {
    /// Index of the step in the schedule.
    pub step: usize,
    /// The entry point launched.
    pub kernel: String,
    /// The linear layer it runs, if any.
    pub layer: Option<String>,
    #[serde(flatten)]
    pub work: KernelWork,
    /// Seconds of fpx's kernel (this model).
    pub seconds: f64,
    /// Seconds the chip allows (datasheet roofline of the same bytes and FLOPs).
    pub bound_seconds: f64,
}

impl KernelCost {
    /// The cost model of `graph`'s kernels on `gpu`.
    pub fn new(gpu: Gpu, graph: &Graph, batch: usize, context: usize) -> Result<KernelCost> {
        if batch == 0 {
            return Err(Error::invalid(
                "--batch",
                "0: a step has at least one token",
            ));
        }
        let spec = gpu.spec();
        let arch: Arch = spec.arch.parse()?;
        Ok(KernelCost {
            gpu,
            spec,
            arch,
            batch,
            context,
            tensor_parallel: 1,
            schedule: Schedule::build(graph, &PrecisionMap::new())?,
            graph: graph.clone(),
        })
    }

    /// Prices activations and KV cache in `act` (FP32 until set).
    pub fn with_act(mut self, act: ActDtype) -> KernelCost {
        self.schedule = self.schedule.with_act(act);
        self
    }

    /// Shards the model over `n` GPUs; heads, KV heads and FFN columns must divide evenly.
    pub fn with_tensor_parallel(mut self, n: usize) -> Result<KernelCost> {
        let d = &self.schedule.dims;
        let uneven = [("heads", d.heads), ("kv heads", d.kv_heads), ("ffn", d.ffn)]
            .into_iter()
            .find(|&(_, v)| n == 0 || v % n != 0);
        if let Some((what, v)) = uneven {
            return Err(Error::invalid(
                "--tensor-parallel",
                format!("{n}: the model's {v} {what} do not split evenly over {n} GPUs"),
            ));
        }
        self.tensor_parallel = n;
        Ok(self)
    }

    /// One all-reduce of the hidden state of `batch` tokens over the interconnect.
    pub fn all_reduce_work(&self) -> KernelWork {
        let n = self.tensor_parallel as f64;
        let message = (self.batch * self.schedule.dims.hidden * self.schedule.act.bytes()) as f64;
        KernelWork {
            bytes: 2.0 * (n - 1.0) / n * message,
            flops: 0.0,
            decode_instructions: 0.0,
            path: InstructionPath::AllReduce,
        }
    }

    /// Seconds of the all-reduces of one step (two per block; 0 without tensor parallelism).
    pub fn all_reduce_seconds(&self) -> f64 {
        if self.tensor_parallel == 1 {
            return 0.0;
        }
        2.0 * self.schedule.dims.layers as f64 * self.seconds(&self.all_reduce_work())
    }

    /// The per-GPU shard of a linear layer of `kind`.
    fn shard(&self, shape: LinearShape, kind: LinearKind) -> LinearShape {
        let n = self.tensor_parallel;
        match kind {
            LinearKind::O | LinearKind::Down => LinearShape {
                k: shape.k.div_ceil(n),
                ..shape
            },
            _ => LinearShape {
                n: shape.n.div_ceil(n),
                ..shape
            },
        }
    }

    /// Replaces the per-kernel launch overhead (seconds).
    pub fn with_launch_overhead(mut self, seconds: f64) -> Result<KernelCost> {
        self.spec = self.spec.with_launch_overhead(seconds)?;
        Ok(self)
    }

    /// Seconds of one launch doing `work` on this GPU with fpx's kernels.
    pub fn seconds(&self, work: &KernelWork) -> f64 {
        let s = &self.spec;
        if work.path == InstructionPath::AllReduce {
            return work.bytes / s.interconnect.bandwidth + s.interconnect.latency;
        }
        self.busy_seconds(work) + s.launch_overhead
    }

    /// [`KernelCost::seconds`] without the launch overhead: the share of a grouped launch
    /// (one MoE expert's projection) that `work` takes.
    fn busy_seconds(&self, work: &KernelWork) -> f64 {
        let s = &self.spec;
        let compute = match work.path {
            InstructionPath::AllReduce => 0.0,
            InstructionPath::SimtF32 => {
                (work.flops / 2.0 + work.decode_instructions) / (s.fp32_flops / 2.0)
            }
            InstructionPath::TensorF16 => work.flops / s.fp16_flops,
            InstructionPath::TensorFp8 => work.flops / s.fp8_flops,
            InstructionPath::TensorFp4 => work.flops / s.fp4_flops.unwrap_or(s.fp16_flops),
        };
        (work.bytes / s.bandwidth).max(compute)
    }

    /// The MoE block whose experts include linear slot `slot`.
    fn moe_of_slot(&self, slot: usize) -> Option<&MoeSlot> {
        self.schedule
            .moes
            .iter()
            .find(|m| m.linears().any(|l| l == slot))
    }

    /// Seconds of one expert projection (`shape`, in its format) in a decode step: its
    /// expected share of the block's grouped launch ([`crate::lower::moe::expert_load`]).
    fn expert_seconds(&self, shape: LinearShape, kind: LinearKind, moe: &MoeSlot) -> f64 {
        let shard = self.shard(shape, kind);
        let work = expert_work(&shard, self.batch, moe.experts.len(), moe.top_k, self.arch);
        self.busy_seconds(&work)
    }

    /// Seconds of MoE block `moe` outside its experts' planned projections: the router, the
    /// five other launches of the block (`Schedule::moe_launches`) and every expert projection
    /// not in `planned`.
    fn moe_fixed_seconds(&self, moe: &MoeSlot, planned: &dyn Fn(&str) -> bool) -> f64 {
        let router = LinearShape {
            n: moe.experts.len(),
            k: self.schedule.dims.hidden,
            format: WeightFormat::F32,
            bias: false,
            accumulate: false,
            act: self.schedule.act,
            w8a8: false,
        };
        let unplanned: f64 = moe
            .linears()
            .map(|l| &self.schedule.linears[l])
            .filter(|l| !planned(&l.name))
            .map(|l| self.expert_seconds(l.shape, l.kind, moe))
            .sum();
        self.seconds(&linear_work(&router, self.batch, self.arch))
            // The block's other launches (gate, up, SiLU-gate, down, combine: `moe_launches`);
            // the SiLU-gate's and combine's few bytes are left out.
            + 5.0 * self.spec.launch_overhead
            + unplanned
    }

    /// Seconds the chip allows for the same bytes and FLOPs: peak bandwidth, or the tensor peak
    /// of the weights' format (16-bit for FP32 and non-linear kernels), no launch overhead.
    pub fn bound(&self, work: &KernelWork, format: WeightFormat) -> f64 {
        let peak = self
            .spec
            .peak_flops(format.format().unwrap_or(Format::Fp16));
        (work.bytes / self.spec.bandwidth).max(work.flops / peak)
    }

    /// The work of `step` in one decode step of `batch` sequences, `shape` replacing a linear
    /// step's own.
    fn step_work(&self, step: &Step, shape: Option<&LinearShape>) -> KernelWork {
        match shape {
            Some(shape) => linear_work(shape, self.batch, self.arch),
            None => self
                .schedule
                .work(step, self.batch, self.context, self.arch),
        }
    }

    /// The schedule of `precision` in this model's activation type, refused where the
    /// generated kernels cannot run it ([`Schedule::check_kernels`]).
    fn schedule_of(&self, precision: &PrecisionMap) -> Result<Schedule> {
        let s = Schedule::build(&self.graph, precision)?.with_act(self.schedule.act);
        s.check_kernels()?;
        Ok(s)
    }

    /// Seconds of `schedule`'s steps that are neither linears nor MoE blocks (norms, the
    /// quantizing steps, attention, ...).
    fn other_steps_seconds(&self, schedule: &Schedule) -> f64 {
        schedule
            .steps
            .iter()
            .filter(|s| !matches!(s, Step::Linear { .. } | Step::Moe { .. }))
            .map(|s| self.seconds(&schedule.work(s, self.batch, self.context, self.arch)))
            .sum()
    }

    /// What quantizing layer `name`'s input for `precision` adds to the step: the schedule's
    /// other steps with it, less without it. The layers reading the same input (q/k/v,
    /// gate/up) are given the same precision and share the cost, so the planner's per-layer
    /// sum is exact when they agree (what `--group` enforces) and the step cost
    /// ([`KernelCost::explain`]) is the truth when they do not.
    fn input_quant_seconds(&self, name: &str, precision: LinearPrecision) -> Result<f64> {
        if precision.activations.is_none() {
            return Ok(0.0);
        }
        let steps = &self.schedule.steps;
        let linear_at = |i: usize| match steps[i] {
            Step::Linear { linear, src, .. } => Some((linear, src)),
            _ => None,
        };
        let at = (0..steps.len())
            .find(|&i| linear_at(i).is_some_and(|(l, _)| self.schedule.linears[l].name == name))
            .ok_or_else(|| Error::Layer {
                layer: name.to_string(),
                reason: format!(
                    "{precision} on a MoE expert: the generated kernels quantize activations \
                     only as W8A8 in dense layers"
                ),
            })?;
        let src = linear_at(at).expect("found").1;
        let reads_src = |i: &usize| linear_at(*i).is_some_and(|(_, s)| s == src);
        let first = (0..at).rev().take_while(reads_src).last().unwrap_or(at);
        let last = (at..steps.len()).take_while(reads_src).last().unwrap_or(at);
        let siblings: PrecisionMap = (first..=last)
            .map(|i| {
                let l = &self.schedule.linears[linear_at(i).expect("a linear").0];
                (l.name.clone(), precision)
            })
            .collect();
        let quantized = self.other_steps_seconds(&self.schedule_of(&siblings)?);
        let added = quantized - self.other_steps_seconds(&self.schedule);
        Ok(added / siblings.len() as f64)
    }

    /// The linear shape of layer `name` in `format`.
    fn shape_of(&self, name: &str, format: WeightFormat) -> Result<LinearShape> {
        let slot = self
            .schedule
            .linears
            .iter()
            .find(|l| l.name == name)
            .ok_or_else(|| Error::Layer {
                layer: name.to_string(),
                reason: "not a linear layer of the model the cost model was built for".into(),
            })?;
        Ok(LinearShape {
            format,
            ..slot.shape
        })
    }

    /// Every launch of one decode step under `precision`, in schedule order: the plan's own
    /// schedule, quantizing steps included.
    pub fn explain(&self, precision: &PrecisionMap) -> Result<Vec<KernelRow>> {
        if let Some(name) = precision
            .keys()
            .find(|n| !self.schedule.linears.iter().any(|l| &l.name == *n))
        {
            return Err(Error::Layer {
                layer: name.clone(),
                reason: "the plan names a layer that is not a linear layer of this model".into(),
            });
        }
        let schedule = self.schedule_of(precision)?;
        let mut rows = Vec::with_capacity(schedule.steps.len());
        for (i, step) in schedule.steps.iter().enumerate() {
            if let Step::Moe { moe } = step {
                rows.extend(self.explain_moe(i, *moe, precision)?);
                continue;
            }
            let linear = match step {
                Step::Linear { linear, .. } => Some(&schedule.linears[*linear]),
                _ => None,
            };
            let (work, kernel, format) = match linear {
                Some(l) => {
                    let shard = self.shard(l.shape, l.kind);
                    let kernel = shard.kernel_for_rows(self.batch).1;
                    (
                        linear_work(&shard, self.batch, self.arch),
                        kernel,
                        l.shape.format,
                    )
                }
                None => (
                    schedule.work(step, self.batch, self.context, self.arch),
                    schedule.entry_of(step, self.batch),
                    WeightFormat::Fp16,
                ),
            };
            rows.push(KernelRow {
                step: i,
                kernel,
                layer: linear.map(|l| l.name.clone()),
                seconds: self.seconds(&work),
                bound_seconds: self.bound(&work, format),
                work,
            });
            // A row-parallel projection's partial sums are all-reduced before the residual add.
            let ends_branch =
                linear.is_some_and(|l| matches!(l.kind, LinearKind::O | LinearKind::Down));
            if ends_branch && self.tensor_parallel > 1 {
                let work = self.all_reduce_work();
                let seconds = self.seconds(&work);
                rows.push(KernelRow {
                    step: i,
                    kernel: format!("all_reduce ({})", self.spec.interconnect.name),
                    layer: None,
                    seconds,
                    bound_seconds: seconds,
                    work,
                });
            }
        }
        Ok(rows)
    }
}

impl KernelCost {
    /// The rows of MoE step `step`: the router and the block's launch overheads, then each
    /// expert projection's expected share ([`KernelCost::expert_seconds`]).
    fn explain_moe(
        &self,
        step: usize,
        block: usize,
        precision: &PrecisionMap,
    ) -> Result<Vec<KernelRow>> {
        let moe = &self.schedule.moes[block];
        let fixed = self.moe_fixed_seconds(moe, &|_| true);
        let [route, .., combine] = self.schedule.moe_kernels(block);
        let mut rows = vec![KernelRow {
            step,
            // The router and the launches that are not an expert projection.
            kernel: format!("{}+silu_mul+{}", route.name(), combine.name()),
            layer: Some(moe.name.clone()),
            seconds: fixed,
            bound_seconds: fixed,
            work: KernelWork {
                bytes: 0.0,
                flops: 0.0,
                decode_instructions: 0.0,
                path: InstructionPath::SimtF32,
            },
        }];
        for slot in moe.linears() {
            let l = &self.schedule.linears[slot];
            let (_, p) = self
                .schedule
                .expert_of(slot)
                .expect("a block's expert slot");
            let f = WeightFormat::of(precision.get(&l.name).map(|p| p.weights));
            let shape = self.shard(self.shape_of(&l.name, f)?, l.kind);
            let work = expert_work(&shape, self.batch, moe.experts.len(), moe.top_k, self.arch);
            rows.push(KernelRow {
                step,
                kernel: self.schedule.expert_kernel(block, p).name(),
                layer: Some(l.name.clone()),
                seconds: self.busy_seconds(&work),
                bound_seconds: self.bound(&work, f),
                work,
            });
        }
        Ok(rows)
    }
}

impl LatencyModel for KernelCost {
    fn source(&self) -> LatencySource {
        LatencySource::Kernels {
            device: self.spec.name.to_string(),
            device_name: self.spec.full_name.to_string(),
            arch: self.arch.name().to_string(),
            batch: self.batch,
            context: self.context,
            tensor_parallel: self.tensor_parallel,
            activations: self.schedule.act,
        }
    }

    fn latency(&self, layer: &LayerShape, precision: LinearPrecision) -> Result<f64> {
        let mut shape = self.shape_of(&layer.name, WeightFormat::of(Some(precision.weights)))?;
        let slot = self
            .schedule
            .linears
            .iter()
            .position(|l| l.name == layer.name);
        let moe = slot.and_then(|s| self.moe_of_slot(s));
        if let (Some(moe), None) = (moe, precision.activations) {
            return Ok(self.expert_seconds(shape, layer.kind, moe));
        }
        // The step the plan would schedule refuses what the kernels cannot run (MoE experts
        // with quantized activations, W4A4) by the layer's name.
        let quantize = self.input_quant_seconds(&layer.name, precision)?;
        shape.w8a8 = precision.is_w8a8();
        let shard = self.shard(shape, layer.kind);
        Ok(self.seconds(&linear_work(&shard, self.batch, self.arch)) + quantize)
    }

    fn fixed_latency(&self, layers: &[LayerShape]) -> f64 {
        let planned: std::collections::BTreeSet<&str> =
            layers.iter().map(|l| l.name.as_str()).collect();
        self.schedule
            .steps
            .iter()
            .filter(|step| match step {
                Step::Linear { linear, .. } => {
                    !planned.contains(self.schedule.linears[*linear].name.as_str())
                }
                _ => true,
            })
            .map(|step| match step {
                Step::Moe { moe } => {
                    self.moe_fixed_seconds(&self.schedule.moes[*moe], &|n| planned.contains(n))
                }
                _ => self.seconds(&self.step_work(step, None)),
            })
            .sum::<f64>()
            + self.all_reduce_seconds()
    }
}
