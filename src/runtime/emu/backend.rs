//! [`EmuBackend`]: an executable plan's steps run by the emulated kernels, in host buffers laid
//! out as the cuda backend's device buffers (activations `[max_seq, cols]`, KV cache per layer
//! `[max_seq, kv_dim]`, the position and the next token as one-element buffers), with the same
//! kernel arguments in the same order.

use std::ffi::c_void;

use super::{arg, launch_linear, EmuKernels, EmuOptions, HostLinear};
use crate::error::Result;
use crate::lower::{Act, Param, Step};
use crate::runtime::exec::{check_pass, Backend, ExecutablePlan, HostBackend, HostState};

/// The plan's buffers on the host and its kernels built for the emulator.
pub struct EmuBackend<'a> {
    plan: &'a ExecutablePlan,
    kernels: EmuKernels,
    linears: Vec<HostLinear>,
    state: HostState,
    tokens: Vec<i32>,
    pos: i32,
}

impl<'a> EmuBackend<'a> {
    /// Builds (through the cache) and loads the plan's kernels; allocates its buffers.
    pub fn new(plan: &'a ExecutablePlan, opts: &EmuOptions) -> Result<EmuBackend<'a>> {
        let kernels = EmuKernels::load(&plan.schedule.kernels(), opts)?;
        Ok(EmuBackend::with_kernels(plan, kernels))
    }

    /// A backend running `kernels` (which must include every kernel of the plan's schedule).
    pub fn with_kernels(plan: &'a ExecutablePlan, kernels: EmuKernels) -> EmuBackend<'a> {
        EmuBackend {
            kernels,
            linears: plan.linears.iter().map(HostLinear::new).collect(),
            state: HostState::new(plan),
            tokens: vec![0; plan.max_seq.max(1)],
            pos: 0,
            plan,
        }
    }

    /// Sets the pass's position and, for a prefill, its tokens (a decode step reads its token
    /// from `next`, where the previous argmax left it, as the cuda backend's graph does).
    fn start_pass(&mut self, tokens: &[u32], pos: usize, decode: bool) {
        self.pos = pos as i32;
        if decode {
            self.state.next = tokens[0] as i32;
        } else {
            for (d, &t) in self.tokens.iter_mut().zip(tokens) {
                *d = t as i32;
            }
        }
    }

    /// Launches `step` for a pass of `m` rows.
    fn launch_step(&mut self, step: Step, m: usize, decode: bool) -> Result<()> {
        let plan = self.plan;
        let s = &plan.schedule;
        let d = &s.dims;
        let mi = m as i32;
        let rows = step.rows(m);
        let st = &mut self.state;
        let act = |st: &mut HostState, a: Act| st.acts[a as usize].as_mut_ptr();
        if let Step::Linear { linear, src, dst } = step {
            let x = act(st, src) as *const f32;
            let y = act(st, dst);
            // SAFETY: distinct activation buffers of max_seq (logits: 1) rows of the layer's
            // k and n columns.
            return unsafe {
                launch_linear(
                    &self.kernels,
                    s.linears[linear].shape,
                    &self.linears[linear],
                    x,
                    y,
                    rows,
                )
            };
        }
        let row0 = step.row0(m);
        let params = step.params(decode);
        // The pointer arguments' values (null for value arguments), then `args` pointing at
        // them or at the locals above (cuLaunchKernel's convention).
        let pointers: Vec<*mut c_void> = params
            .iter()
            .map(|&p| match p {
                Param::Act(a) => act(st, a).cast(),
                Param::Tokens => self.tokens.as_mut_ptr().cast(),
                Param::Next => (&mut st.next as *mut i32).cast(),
                Param::Embedding => plan.embedding.as_ptr() as *mut c_void,
                Param::Norm(i) => plan.norms[i].as_ptr() as *mut c_void,
                Param::KCache(l) => st.k_cache[l].as_mut_ptr().cast(),
                Param::VCache(l) => st.v_cache[l].as_mut_ptr().cast(),
                Param::RopeCos => plan.rope_cos.as_ptr() as *mut c_void,
                Param::RopeSin => plan.rope_sin.as_ptr() as *mut c_void,
                Param::Pos => (&mut self.pos as *mut i32).cast(),
                Param::Rows | Param::Eps | Param::Row0 => std::ptr::null_mut(),
            })
            .collect();
        let mut args: Vec<*mut c_void> = params
            .iter()
            .zip(&pointers)
            .map(|(p, ptr)| match p {
                Param::Rows => arg(&mi),
                Param::Eps => arg(&d.eps),
                Param::Row0 => arg(&row0),
                _ => arg(ptr),
            })
            .collect();
        let spec = s.kernels_of(&step)[0];
        // SAFETY: `Step::params` lists each template's kernel signature in order (the list the
        // cuda backend passes too), over buffers of the plan's sizes.
        unsafe {
            self.kernels
                .launch(&spec, &spec.name(), rows, plan.max_seq, &mut args)
        }
    }
}

impl Backend for EmuBackend<'_> {
    fn name(&self) -> &'static str {
        "emu"
    }

    fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<u32> {
        check_pass(self.plan, tokens, pos)?;
        let decode = tokens.len() == 1 && pos > 0;
        self.start_pass(tokens, pos, decode);
        for &step in &self.plan.schedule.steps {
            self.launch_step(step, tokens.len(), decode)?;
        }
        Ok(self.state.next.max(0) as u32)
    }

    fn logits(&mut self) -> Result<Vec<f32>> {
        let vocab = self.plan.schedule.dims.vocab;
        Ok(self.state.act(Act::Logits)[..vocab].to_vec())
    }
}

impl HostBackend for EmuBackend<'_> {
    fn state(&self) -> &HostState {
        &self.state
    }

    fn state_mut(&mut self) -> &mut HostState {
        &mut self.state
    }

    fn run_step(&mut self, index: usize, tokens: &[u32], pos: usize) -> Result<()> {
        self.start_pass(tokens, pos, false);
        self.launch_step(self.plan.schedule.steps[index], tokens.len(), false)
    }
}
