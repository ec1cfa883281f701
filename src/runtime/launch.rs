//! One launcher for the generated kernels. A backend that runs them (cuda on a GPU, emu on the
//! CPU) implements [`Launcher`]: allocate and fill buffers, read them back, launch one entry
//! point with a list of [`Arg`]s. Everything else is written once, here:
//!
//! - [`ParamBuffers`], [`SequenceBuffers`]: the plan's parameters in the kernels' byte layouts
//!   (packed linear layers, stacked experts, the embedding table in the activation type, FP32
//!   norms, routers and RoPE tables) and one sequence's activations, KV cache, tokens,
//!   position, next token and MoE routing;
//! - [`launch_args`]: the binding of a launch's [`Param`]s to those buffers (the kernel
//!   argument order lives in [`Step::params`] and `Schedule::moe_launches`);
//! - [`KernelBackend`]: a [`Backend`] over any launcher: prefill, decode steps reading their
//!   token from the previous argmax, logits read back and widened.
//!
//! A new backend is a [`Launcher`] implementation: a page of code.

use super::exec::{check_pass, Backend, ExecutablePlan, PackedLinear};
use crate::error::Result;
use crate::formats::fp8;
use crate::lower::{
    split_kv, Act, ActDtype, KernelSpec, LinearShape, Param, Schedule, Step, StepLaunch,
};

/// One kernel argument: a buffer (passed as its device pointer) or a value.
pub enum Arg<'a, B> {
    Buf(&'a B),
    I32(i32),
    F32(f32),
}

/// A backend's memory: buffers it allocates, fills and reads back.
pub trait Memory {
    /// A buffer in the backend's memory (device memory, or host memory for the emulator).
    type Buf;

    /// A buffer holding `bytes` (at least one element's worth is allocated for empty data, so
    /// that every pointer is valid).
    fn upload(&self, bytes: &[u8]) -> Result<Self::Buf>;
    /// A zeroed buffer of `bytes` bytes.
    fn zeros(&self, bytes: usize) -> Result<Self::Buf>;
    /// Overwrites the first `bytes.len()` bytes of `buf`.
    fn write(&self, buf: &mut Self::Buf, bytes: &[u8]) -> Result<()>;
    /// The first `len` bytes of `buf`.
    fn read(&self, buf: &Self::Buf, len: usize) -> Result<Vec<u8>>;
}

/// What a backend must do to run generated kernels: its memory, and one launch.
pub trait Launcher: Memory {
    /// Launches entry point `entry` of kernel `spec` for `rows` activation rows over `context`
    /// KV positions (the launch dimensions come from the kernel's context).
    ///
    /// # Safety
    /// `args` must match the kernel's signature, and every buffer must be as large as the
    /// spec's shapes imply.
    unsafe fn launch(
        &self,
        spec: &KernelSpec,
        entry: &str,
        rows: usize,
        context: usize,
        args: &[Arg<'_, Self::Buf>],
    ) -> Result<()>;
}

/// A linear layer's buffers as the kernels read them.
pub struct LinearBuffers<B> {
    pub codes: B,
    /// fp8 row scales as FP32 bytes, FP4 block-scale bytes, or nothing.
    pub scales: B,
    pub global: f32,
    pub bias: B,
}

impl<B> LinearBuffers<B> {
    pub fn upload<L: Memory<Buf = B>>(l: &L, packed: &PackedLinear) -> Result<Self> {
        let bias = ActDtype::F32.encode(packed.bias.as_deref().unwrap_or(&[]));
        Ok(LinearBuffers {
            codes: l.upload(&packed.codes)?,
            scales: l.upload(&packed.scales.kernel_bytes())?,
            global: packed.global,
            bias: l.upload(&bias)?,
        })
    }
}

/// One projection of a MoE block's experts as its grouped GEMV reads them: every expert's
/// codes, scales and bias concatenated in expert order, and one NVFP4 tensor scale per expert.
pub struct ExpertBuffers<B> {
    pub codes: B,
    pub scales: B,
    pub globals: B,
    pub bias: B,
}

impl<B> ExpertBuffers<B> {
    /// Stacks `experts` (one format and shape: `Schedule::check_expert_kernels`).
    pub fn upload<'p, L: Memory<Buf = B>>(
        l: &L,
        experts: impl Iterator<Item = &'p PackedLinear>,
    ) -> Result<Self> {
        let (mut codes, mut scales, mut globals, mut bias) = (vec![], vec![], vec![], vec![]);
        for p in experts {
            codes.extend_from_slice(&p.codes);
            scales.extend(p.scales.kernel_bytes());
            globals.push(p.global);
            bias.extend(p.bias.as_deref().unwrap_or(&[]));
        }
        Ok(ExpertBuffers {
            codes: l.upload(&codes)?,
            scales: l.upload(&scales)?,
            globals: l.upload(&ActDtype::F32.encode(&globals))?,
            bias: l.upload(&ActDtype::F32.encode(&bias))?,
        })
    }
}

/// The buffers of one sequence: activations by [`Act`] (`Schedule::act_rows` rows of
/// `Schedule::act_cols`) and a `[max_seq, kv_dim]` K and V cache per layer, all in the
/// schedule's activation type; the prompt's token ids, the pass's first position and the
/// greedy next token (`i32`); split attention's partials; a MoE block's routing (each pair's
/// expert, `i32`, and weight, `f32`).
#[derive(Clone)]
pub struct SequenceBuffers<B> {
    pub acts: Vec<B>,
    pub k_cache: Vec<B>,
    pub v_cache: Vec<B>,
    pub tokens: B,
    pub pos: B,
    pub next: B,
    /// Split attention's partials and counters ([`crate::lower::split_kv`]), zeroed.
    pub attn_partials: B,
    /// `[max_seq, top_k]` experts and weights of the MoE block being run.
    pub route_ids: B,
    pub route_weights: B,
    /// W8A8 inputs: `[max_seq, Schedule::x_codes_cols]` E4M3 codes and `[max_seq]` FP32 row
    /// scales.
    pub x_codes: B,
    pub x_scales: B,
}

impl<B> SequenceBuffers<B> {
    /// Zeroed buffers for `plan`.
    pub fn zeros<L: Memory<Buf = B>>(l: &L, plan: &ExecutablePlan) -> Result<Self> {
        Self::for_schedule(l, &plan.schedule, plan.max_seq)
    }

    /// Zeroed buffers for `schedule` and `max_seq` positions.
    pub fn for_schedule<L: Memory<Buf = B>>(l: &L, s: &Schedule, max_seq: usize) -> Result<Self> {
        let e = s.act.bytes();
        let acts = Act::ALL
            .iter()
            .map(|&a| l.zeros(s.act_rows(max_seq, a) * s.act_cols(a) * e))
            .collect::<Result<_>>()?;
        let cache = || -> Result<Vec<B>> {
            (0..s.dims.layers)
                .map(|_| l.zeros(max_seq * s.dims.kv_dim * e))
                .collect()
        };
        Ok(SequenceBuffers {
            acts,
            k_cache: cache()?,
            v_cache: cache()?,
            tokens: l.zeros(4 * max_seq)?,
            pos: l.zeros(4)?,
            next: l.zeros(4)?,
            attn_partials: l.zeros(split_kv::partials_bytes(s.dims.heads, s.dims.head_dim))?,
            route_ids: l.zeros(4 * max_seq * s.moe_top_k())?,
            route_weights: l.zeros(4 * max_seq * s.moe_top_k())?,
            x_codes: l.zeros(max_seq * s.x_codes_cols())?,
            x_scales: l.zeros(4 * max_seq)?,
        })
    }
}

/// The plan's parameters in a backend's memory.
pub struct ParamBuffers<B> {
    /// `[vocab, hidden]` in the activation type.
    pub embedding: B,
    pub norms: Vec<B>,
    pub linears: Vec<LinearBuffers<B>>,
    pub rope_cos: B,
    pub rope_sin: B,
    /// Per MoE block: the router (FP32) and its gate, up and down experts.
    pub routers: Vec<B>,
    pub experts: Vec<[ExpertBuffers<B>; 3]>,
}

impl<B> ParamBuffers<B> {
    pub fn upload<L: Memory<Buf = B>>(l: &L, plan: &ExecutablePlan) -> Result<Self> {
        let f32s = |v: &[f32]| l.upload(&ActDtype::F32.encode(v));
        Ok(ParamBuffers {
            embedding: l.upload(&plan.schedule.act.encode(&plan.embedding))?,
            norms: plan.norms.iter().map(|n| f32s(n)).collect::<Result<_>>()?,
            linears: plan
                .linears
                .iter()
                .map(|p| LinearBuffers::upload(l, p))
                .collect::<Result<_>>()?,
            rope_cos: f32s(&plan.rope_cos)?,
            rope_sin: f32s(&plan.rope_sin)?,
            routers: plan
                .routers
                .iter()
                .map(|r| f32s(r))
                .collect::<Result<_>>()?,
            experts: (plan.schedule.moes.iter())
                .map(|m| -> Result<[ExpertBuffers<B>; 3]> {
                    let proj = |p: usize| {
                        ExpertBuffers::upload(l, m.experts.iter().map(|e| &plan.linears[e[p]]))
                    };
                    Ok([proj(0)?, proj(1)?, proj(2)?])
                })
                .collect::<Result<_>>()?,
        })
    }
}

/// What a linear kernel reads as its input: activations, or (a W8A8 layer,
/// [`LinearShape::w8a8`]) FP8 codes and their row scales.
pub enum LinearInput<'b, B> {
    Act(&'b B),
    Fp8 { codes: &'b B, scales: &'b B },
}

// Not derived: a derive would ask `B: Copy`, and only references are copied.
impl<B> Clone for LinearInput<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B> Copy for LinearInput<'_, B> {}

/// The arguments of a linear kernel on standalone buffers (`x` and `y` hold `rows` rows), in
/// the order [`Step::params`] gives a linear step.
pub fn linear_args<'b, B>(
    w: &'b LinearBuffers<B>,
    x: LinearInput<'b, B>,
    y: &'b B,
    rows: usize,
) -> Vec<Arg<'b, B>> {
    let (src, dst) = (Act::Xn, Act::Q);
    let w8a8 = matches!(x, LinearInput::Fp8 { .. });
    Step::Linear {
        linear: 0,
        src,
        dst,
        w8a8,
    }
    .params(false)
    .into_iter()
    .map(|p| match (p, x) {
        (Param::LinearCodes(_), _) => Arg::Buf(&w.codes),
        (Param::LinearScales(_), _) => Arg::Buf(&w.scales),
        (Param::LinearGlobal(_), _) => Arg::F32(w.global),
        (Param::LinearBias(_), _) => Arg::Buf(&w.bias),
        (Param::Act(a), LinearInput::Act(x)) if a == src => Arg::Buf(x),
        (Param::XCodes, LinearInput::Fp8 { codes, .. }) => Arg::Buf(codes),
        (Param::XScales, LinearInput::Fp8 { scales, .. }) => Arg::Buf(scales),
        (Param::Act(_), _) => Arg::Buf(y),
        (Param::Rows, _) => Arg::I32(rows as i32),
        (other, _) => unreachable!("a linear step has no {other:?} parameter"),
    })
    .collect()
}

/// Runs one linear layer on `l` (its kernels loaded): `y_init` is the `[rows, n]` output before
/// the kernel (it matters for `accumulate`); returns it after, widened to FP32. `x` and `y_init`
/// are rounded to `shape.act` on the way in.
pub fn run_linear<L: Launcher>(
    l: &L,
    shape: LinearShape,
    packed: &PackedLinear,
    x: &[f32],
    rows: usize,
    y_init: &[f32],
) -> Result<Vec<f32>> {
    run_linear_on(
        l,
        shape,
        &LinearBuffers::upload(l, packed)?,
        x,
        rows,
        y_init,
    )
}

/// [`run_linear`] on weights already in the launcher's memory.
pub fn run_linear_on<L: Launcher>(
    l: &L,
    shape: LinearShape,
    w: &LinearBuffers<L::Buf>,
    x: &[f32],
    rows: usize,
    y_init: &[f32],
) -> Result<Vec<f32>> {
    if x.len() < rows * shape.k || y_init.len() < rows * shape.n {
        return Err(crate::error::Error::invalid(
            "linear input",
            format!(
                "{rows} rows need {} x and {} y values",
                rows * shape.k,
                rows * shape.n
            ),
        ));
    }
    let x_act = shape.act.encode(&x[..rows * shape.k]);
    let y = l.upload(&shape.act.encode(&y_init[..rows * shape.n]))?;
    let (spec, entry) = shape.kernel_for_rows(rows);
    let (x, x_scales);
    let input = if shape.w8a8 {
        // The CPU reference's quantizer, as a quantizing step leaves the codes.
        let (codes, scales) = fp8::quantize_rows(&shape.act.decode(&x_act), rows, shape.k);
        x = l.upload(&codes)?;
        x_scales = l.upload(&ActDtype::F32.encode(&scales))?;
        LinearInput::Fp8 {
            codes: &x,
            scales: &x_scales,
        }
    } else {
        x = l.upload(&x_act)?;
        LinearInput::Act(&x)
    };
    // SAFETY: x and y hold rows x k and rows x n elements of the layer's activation type (x:
    // codes and row scales for W8A8).
    unsafe { l.launch(&spec, &entry, rows, 0, &linear_args(w, input, &y, rows))? };
    let bytes = l.read(&y, rows * shape.n * shape.act.bytes())?;
    Ok(shape.act.decode(&bytes))
}

/// The kernel arguments of launch `launch`: its [`Param`]s bound to a plan's parameter and
/// sequence buffers (the one binding every launcher uses).
pub fn launch_args<'b, B>(
    schedule: &Schedule,
    p: &'b ParamBuffers<B>,
    s: &'b SequenceBuffers<B>,
    launch: &StepLaunch,
) -> Vec<Arg<'b, B>> {
    (launch.params.iter())
        .map(|&param| match param {
            Param::Act(a) => Arg::Buf(&s.acts[a as usize]),
            Param::Tokens => Arg::Buf(&s.tokens),
            Param::Next => Arg::Buf(&s.next),
            Param::Embedding => Arg::Buf(&p.embedding),
            Param::Norm(i) => Arg::Buf(&p.norms[i]),
            Param::KCache(l) => Arg::Buf(&s.k_cache[l]),
            Param::VCache(l) => Arg::Buf(&s.v_cache[l]),
            Param::RopeCos => Arg::Buf(&p.rope_cos),
            Param::RopeSin => Arg::Buf(&p.rope_sin),
            Param::Pos => Arg::Buf(&s.pos),
            Param::AttnPartials => Arg::Buf(&s.attn_partials),
            Param::Rows => Arg::I32(launch.rows as i32),
            Param::Eps => Arg::F32(schedule.dims.eps),
            Param::Row0 => Arg::I32(launch.row0),
            Param::LinearCodes(i) => Arg::Buf(&p.linears[i].codes),
            Param::LinearScales(i) => Arg::Buf(&p.linears[i].scales),
            Param::LinearGlobal(i) => Arg::F32(p.linears[i].global),
            Param::LinearBias(i) => Arg::Buf(&p.linears[i].bias),
            Param::Router(i) => Arg::Buf(&p.routers[i]),
            Param::RouteIds => Arg::Buf(&s.route_ids),
            Param::RouteWeights => Arg::Buf(&s.route_weights),
            Param::ExpertCodes(b, e) => Arg::Buf(&p.experts[b][e].codes),
            Param::ExpertScales(b, e) => Arg::Buf(&p.experts[b][e].scales),
            Param::ExpertGlobals(b, e) => Arg::Buf(&p.experts[b][e].globals),
            Param::ExpertBias(b, e) => Arg::Buf(&p.experts[b][e].bias),
            Param::XCodes => Arg::Buf(&s.x_codes),
            Param::XScales => Arg::Buf(&s.x_scales),
        })
        .collect()
}

/// Launches `launch` on `l` with context `max_seq`.
///
/// # Safety
/// `params` and `seq` must hold the buffers of the plan `launch` belongs to.
pub unsafe fn launch_on<L: Launcher>(
    l: &L,
    schedule: &Schedule,
    params: &ParamBuffers<L::Buf>,
    seq: &SequenceBuffers<L::Buf>,
    launch: &StepLaunch,
    max_seq: usize,
) -> Result<()> {
    let args = launch_args(schedule, params, seq, launch);
    // SAFETY: `StepLaunch::params` lists the template's kernel signature in order, and the
    // caller's buffers were allocated for this plan's shapes.
    unsafe { l.launch(&launch.spec, &launch.entry, launch.rows, max_seq, &args) }
}

/// An executable plan on a [`Launcher`]: its parameters and one sequence's buffers.
pub struct KernelBackend<'a, L: Launcher> {
    pub plan: &'a ExecutablePlan,
    pub launcher: L,
    pub params: ParamBuffers<L::Buf>,
    pub seq: SequenceBuffers<L::Buf>,
    name: &'static str,
}

impl<'a, L: Launcher> KernelBackend<'a, L> {
    /// Uploads `plan`'s parameters and allocates its buffers on `launcher` (which must have
    /// every kernel of the plan's schedule loaded).
    pub fn on(plan: &'a ExecutablePlan, launcher: L, name: &'static str) -> Result<Self> {
        Ok(KernelBackend {
            params: ParamBuffers::upload(&launcher, plan)?,
            seq: SequenceBuffers::zeros(&launcher, plan)?,
            launcher,
            plan,
            name,
        })
    }

    /// Writes the pass's position and, for a prefill, its tokens; a decode step's token goes to
    /// `next`, where the embedding reads it (as the previous argmax leaves it).
    pub fn start_pass(&mut self, tokens: &[u32], pos: usize, decode: bool) -> Result<()> {
        let l = &self.launcher;
        l.write(&mut self.seq.pos, &(pos as i32).to_le_bytes())?;
        if decode {
            l.write(&mut self.seq.next, &(tokens[0] as i32).to_le_bytes())
        } else {
            let ids: Vec<u8> = tokens
                .iter()
                .flat_map(|&t| (t as i32).to_le_bytes())
                .collect();
            l.write(&mut self.seq.tokens, &ids)
        }
    }

    /// Launches step `index` of the schedule for a pass of `m` rows.
    pub fn launch_step(&self, index: usize, m: usize, decode: bool) -> Result<()> {
        let s = &self.plan.schedule;
        for launch in s.launches(&s.steps[index], m, decode) {
            // SAFETY: the buffers were allocated and uploaded for this plan.
            unsafe {
                launch_on(
                    &self.launcher,
                    s,
                    &self.params,
                    &self.seq,
                    &launch,
                    self.plan.max_seq,
                )?
            };
        }
        Ok(())
    }

    /// Launches every step for a pass of `m` rows.
    pub fn launch_steps(&self, m: usize, decode: bool) -> Result<()> {
        (0..self.plan.schedule.steps.len()).try_for_each(|i| self.launch_step(i, m, decode))
    }

    /// The greedy next token the last argmax left.
    pub fn next_token(&self) -> Result<u32> {
        let b = self.launcher.read(&self.seq.next, 4)?;
        Ok(i32::from_le_bytes([b[0], b[1], b[2], b[3]]).max(0) as u32)
    }
}

/// A launcher that can run a whole pass its own way (the cuda backend replays decode steps from
/// a captured CUDA graph); the default launches the steps one by one.
pub trait RunPass: Launcher + Sized {
    fn run_pass(backend: &mut KernelBackend<'_, Self>, m: usize, decode: bool) -> Result<()> {
        backend.launch_steps(m, decode)
    }
}

impl<L: RunPass> Backend for KernelBackend<'_, L> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<u32> {
        check_pass(self.plan, tokens, pos)?;
        let decode = tokens.len() == 1 && pos > 0;
        self.start_pass(tokens, pos, decode)?;
        L::run_pass(self, tokens.len(), decode)?;
        self.next_token()
    }

    fn logits(&mut self) -> Result<Vec<f32>> {
        let s = &self.plan.schedule;
        let bytes = self.launcher.read(
            &self.seq.acts[Act::Logits as usize],
            s.dims.vocab * s.act.bytes(),
        )?;
        Ok(s.act.decode(&bytes))
    }
}
