//! [`EmuBackend`]: an executable plan's steps run by the emulated kernels, in host buffers laid
//! out as the cuda backend's device buffers (activations `[max_seq, cols]`, KV cache per layer
//! `[max_seq, kv_dim]`, the position and the next token as one-element buffers), with the same
//! kernel arguments in the same order.

use std::ffi::c_void;

use super::{arg, launch_linear, EmuKernels, EmuOptions, HostLinear};
use crate::codegen::{Act, Step};
use crate::error::Result;
use crate::runtime::exec::{check_pass, Backend, ExecutablePlan};

/// The plan's buffers on the host and its kernels built for the emulator.
pub struct EmuBackend<'a> {
    plan: &'a ExecutablePlan,
    kernels: EmuKernels,
    linears: Vec<HostLinear>,
    acts: Vec<Vec<f32>>,
    k_cache: Vec<Vec<f32>>,
    v_cache: Vec<Vec<f32>>,
    tokens: Vec<i32>,
    pos: Vec<i32>,
    next: Vec<i32>,
}

impl<'a> EmuBackend<'a> {
    /// Builds (through the cache) and loads the plan's kernels; allocates its buffers.
    pub fn new(plan: &'a ExecutablePlan, opts: &EmuOptions) -> Result<EmuBackend<'a>> {
        let kernels = EmuKernels::load(&plan.schedule.kernels(), opts)?;
        Ok(EmuBackend::with_kernels(plan, kernels))
    }

    /// A backend running `kernels` (which must include every kernel of the plan's schedule).
    pub fn with_kernels(plan: &'a ExecutablePlan, kernels: EmuKernels) -> EmuBackend<'a> {
        let s = &plan.schedule;
        let d = &s.dims;
        let acts = Act::ALL
            .iter()
            .map(|&a| {
                let rows = if a == Act::Logits { 1 } else { plan.max_seq };
                vec![0f32; (rows * s.act_cols(a)).max(1)]
            })
            .collect();
        let cache = || vec![0f32; (plan.max_seq * d.kv_dim).max(1)];
        EmuBackend {
            kernels,
            linears: plan.linears.iter().map(HostLinear::new).collect(),
            acts,
            k_cache: (0..d.layers).map(|_| cache()).collect(),
            v_cache: (0..d.layers).map(|_| cache()).collect(),
            tokens: vec![0; plan.max_seq.max(1)],
            pos: vec![0],
            next: vec![0],
            plan,
        }
    }

    /// Launches every step for `m` rows; `decode` reads the token from the previous argmax.
    fn launch_steps(&mut self, m: usize, decode: bool) -> Result<()> {
        let plan = self.plan;
        let s = &plan.schedule;
        let d = &s.dims;
        let mi = m as i32;
        let act = |acts: &mut Vec<Vec<f32>>, a: Act| acts[a as usize].as_mut_ptr();
        for &step in &s.steps {
            let specs = s.kernels_of(&step);
            let spec = specs[0];
            let name = spec.name();
            if let Step::Linear { linear, src, dst } = step {
                let rows = if dst == Act::Logits { 1 } else { m };
                let x = act(&mut self.acts, src) as *const f32;
                let y = act(&mut self.acts, dst);
                // SAFETY: distinct activation buffers of max_seq (logits: 1) rows of the
                // layer's k and n columns.
                unsafe {
                    launch_linear(
                        &self.kernels,
                        s.linears[linear].shape,
                        &self.linears[linear],
                        x,
                        y,
                        rows,
                    )?
                };
                continue;
            }
            let last_row = matches!(step, Step::RmsNorm { last_row: true, .. });
            let rows = if last_row { 1 } else { m };
            let row0: i32 = if last_row { mi - 1 } else { 0 };
            let q = act(&mut self.acts, Act::Q);
            let pos = self.pos.as_mut_ptr();
            let mut args: Vec<*mut c_void> = Vec::with_capacity(9);
            // Pointer values live in `ptrs` so that `args` can point at them.
            let mut ptrs: Vec<*mut c_void> = Vec::with_capacity(9);
            match step {
                Step::Embed => {
                    let tokens = if decode {
                        self.next.as_mut_ptr()
                    } else {
                        self.tokens.as_mut_ptr()
                    };
                    ptrs.extend([
                        tokens.cast(),
                        plan.embedding.as_ptr() as *mut c_void,
                        act(&mut self.acts, Act::X).cast(),
                    ]);
                }
                Step::RmsNorm { norm, src, dst, .. } => ptrs.extend([
                    act(&mut self.acts, src).cast(),
                    plan.norms[norm].as_ptr() as *mut c_void,
                    act(&mut self.acts, dst).cast(),
                ]),
                Step::RopeKv { layer } => ptrs.extend([
                    q.cast(),
                    act(&mut self.acts, Act::K).cast(),
                    act(&mut self.acts, Act::V).cast(),
                    self.k_cache[layer].as_mut_ptr().cast(),
                    self.v_cache[layer].as_mut_ptr().cast(),
                    plan.rope_cos.as_ptr() as *mut c_void,
                    plan.rope_sin.as_ptr() as *mut c_void,
                    pos.cast(),
                ]),
                Step::Attention { layer } => ptrs.extend([
                    q.cast(),
                    self.k_cache[layer].as_mut_ptr().cast(),
                    self.v_cache[layer].as_mut_ptr().cast(),
                    act(&mut self.acts, Act::Att).cast(),
                    pos.cast(),
                ]),
                Step::SiluMul => ptrs.extend([
                    act(&mut self.acts, Act::Gate).cast(),
                    act(&mut self.acts, Act::Up).cast(),
                ]),
                Step::Argmax => ptrs.extend([
                    act(&mut self.acts, Act::Logits).cast(),
                    self.next.as_mut_ptr().cast(),
                ]),
                Step::Linear { .. } => unreachable!("launched above"),
            }
            args.extend(ptrs.iter().map(arg));
            match step {
                Step::Embed | Step::RopeKv { .. } | Step::Attention { .. } | Step::SiluMul => {
                    args.push(arg(&mi))
                }
                Step::RmsNorm { .. } => {
                    args.push(arg(&d.eps));
                    args.push(arg(&row0));
                }
                _ => {}
            }
            // SAFETY: each argument list matches its template's kernel signature (the same
            // lists as the cuda backend's) over buffers of the plan's sizes.
            unsafe {
                self.kernels
                    .launch(&spec, &name, rows, plan.max_seq, &mut args)?
            };
        }
        Ok(())
    }
}

impl Backend for EmuBackend<'_> {
    fn name(&self) -> &'static str {
        "emu"
    }

    fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<u32> {
        check_pass(self.plan, tokens, pos)?;
        self.pos[0] = pos as i32;
        let decode = tokens.len() == 1 && pos > 0;
        if decode {
            self.next[0] = tokens[0] as i32;
            self.launch_steps(1, true)?;
        } else {
            for (d, &t) in self.tokens.iter_mut().zip(tokens) {
                *d = t as i32;
            }
            self.launch_steps(tokens.len(), false)?;
        }
        Ok(self.next[0].max(0) as u32)
    }

    fn logits(&mut self) -> Result<Vec<f32>> {
        let mut v = self.acts[Act::Logits as usize].clone();
        v.truncate(self.plan.schedule.dims.vocab);
        Ok(v)
    }
}
