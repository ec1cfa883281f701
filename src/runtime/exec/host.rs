//! The buffers of one sequence in host memory, laid out as the cuda backend's device buffers
//! (activations `[max_seq, cols]` by [`Act`], logits one row, a `[max_seq, kv_dim]` KV cache
//! per layer, the greedy next token), shared by the two host backends (cpu, emu); and a
//! kernel-by-kernel comparison of two such backends: before every step the backend under test
//! gets a copy of the reference's buffers, so each kernel runs on exactly the reference's
//! inputs and a difference points at that kernel alone, not at an error carried from earlier.

use super::generate::Backend;
use super::ExecutablePlan;
use crate::error::Result;
use crate::lower::{Act, Step};

/// Activations, KV cache and next token of one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct HostState {
    /// Activation buffers by [`Act`] (index `act as usize`), `[max_seq, cols]` (logits: 1 row).
    pub acts: Vec<Vec<f32>>,
    pub k_cache: Vec<Vec<f32>>,
    pub v_cache: Vec<Vec<f32>>,
    /// The token the last argmax step chose.
    pub next: i32,
}

impl HostState {
    /// Zeroed buffers for `plan` (each at least one element, so every pointer is valid).
    pub fn new(plan: &ExecutablePlan) -> HostState {
        let s = &plan.schedule;
        let acts = Act::ALL
            .iter()
            .map(|&a| {
                let rows = if a == Act::Logits { 1 } else { plan.max_seq };
                vec![0f32; (rows * s.act_cols(a)).max(1)]
            })
            .collect();
        let layers = s.dims.layers;
        let cache = || vec![0f32; (plan.max_seq * s.dims.kv_dim).max(1)];
        HostState {
            acts,
            k_cache: (0..layers).map(|_| cache()).collect(),
            v_cache: (0..layers).map(|_| cache()).collect(),
            next: 0,
        }
    }

    /// The buffer of `act`.
    pub fn act(&self, act: Act) -> &[f32] {
        &self.acts[act as usize]
    }

    /// What `step` wrote in a pass of `m` rows at position `pos`, copied out: its destination
    /// rows (RoPE: the rotated queries, then the pass's rows of the K and V cache; argmax: the
    /// token).
    pub fn step_output(&self, plan: &ExecutablePlan, step: Step, m: usize, pos: usize) -> Vec<f32> {
        let s = &plan.schedule;
        let rows_of = |a: Act, rows: usize| self.act(a)[..rows * s.act_cols(a)].to_vec();
        let rows = step.rows(m);
        match step {
            Step::Embed => rows_of(Act::X, rows),
            Step::RmsNorm { dst, .. } | Step::Linear { dst, .. } => rows_of(dst, rows),
            Step::RopeKv { layer } => {
                let kv = s.dims.kv_dim;
                let span = pos * kv..(pos + m) * kv;
                let mut v = rows_of(Act::Q, rows);
                v.extend_from_slice(&self.k_cache[layer][span.clone()]);
                v.extend_from_slice(&self.v_cache[layer][span]);
                v
            }
            Step::Attention { .. } => rows_of(Act::Att, rows),
            Step::SiluMul => rows_of(Act::Gate, rows),
            Step::Argmax => vec![self.next as f32],
        }
    }
}

/// A backend whose buffers are a [`HostState`] and that can run one step at a time.
pub trait HostBackend: Backend {
    fn state(&self) -> &HostState;
    fn state_mut(&mut self) -> &mut HostState;
    /// Runs step `index` of the plan's schedule for a pass of `tokens` at `pos` (the pass must
    /// fit the plan: see [`Backend::forward`]).
    fn run_step(&mut self, index: usize, tokens: &[u32], pos: usize) -> Result<()>;
}

/// One step of [`compare_steps`].
#[derive(Debug, Clone)]
pub struct StepComparison {
    pub index: usize,
    pub step: Step,
    /// The entry point the step launched (`gemv_fp8_64x64_m8`, `rmsnorm_64`, ...).
    pub kernel: String,
    /// Values compared.
    pub len: usize,
    /// Largest |test - reference| (infinite where exactly one of them is NaN).
    pub max_abs: f32,
    /// Largest |reference|.
    pub scale: f32,
}

impl StepComparison {
    /// [`max_abs`](Self::max_abs) relative to the largest reference value.
    pub fn rel(&self) -> f32 {
        self.max_abs / self.scale.max(f32::MIN_POSITIVE)
    }
}

/// Runs a pass of `tokens` at `pos` one step at a time on `reference` and on `test`, copying
/// the reference's buffers into `test` before each step, and compares what each step wrote.
pub fn compare_steps(
    plan: &ExecutablePlan,
    reference: &mut dyn HostBackend,
    test: &mut dyn HostBackend,
    tokens: &[u32],
    pos: usize,
) -> Result<Vec<StepComparison>> {
    super::check_pass(plan, tokens, pos)?;
    let m = tokens.len();
    let mut out = Vec::with_capacity(plan.schedule.steps.len());
    for (index, &step) in plan.schedule.steps.iter().enumerate() {
        test.state_mut().clone_from(reference.state());
        reference.run_step(index, tokens, pos)?;
        test.run_step(index, tokens, pos)?;
        let want = reference.state().step_output(plan, step, m, pos);
        let got = test.state().step_output(plan, step, m, pos);
        let max_abs = got
            .iter()
            .zip(&want)
            .map(|(g, w)| match (g.is_nan(), w.is_nan()) {
                (true, true) => 0.0,
                (false, false) => (g - w).abs(),
                _ => f32::INFINITY,
            })
            .fold(0f32, f32::max);
        out.push(StepComparison {
            index,
            step,
            kernel: plan.schedule.entry_of(&step, m),
            len: want.len(),
            max_abs,
            scale: want.iter().fold(0f32, |a, v| a.max(v.abs())),
        });
    }
    Ok(out)
}
