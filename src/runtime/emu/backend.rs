//! [`EmuBackend`]: an executable plan's steps run by the emulated kernels through the one
//! launcher ([`KernelBackend`]), in host buffers laid out as the cuda backend's device buffers,
//! with the same kernel arguments in the same order. Its buffers are a [`HostState`], so
//! [`compare_steps`](crate::runtime::exec::compare_steps) can check it against the cpu backend
//! kernel by kernel.

use super::{EmuKernels, EmuOptions};
use crate::error::Result;
use crate::runtime::exec::{ExecutablePlan, HostBackend, HostState};
use crate::runtime::launch::KernelBackend;

/// The plan's buffers on the host and its kernels built for the emulator.
pub type EmuBackend<'a> = KernelBackend<'a, EmuKernels>;

impl<'a> KernelBackend<'a, EmuKernels> {
    /// Builds (through the cache) and loads the plan's kernels; allocates its buffers.
    pub fn new(plan: &'a ExecutablePlan, opts: &EmuOptions) -> Result<EmuBackend<'a>> {
        let kernels = EmuKernels::load(&plan.schedule.kernels(), opts)?;
        EmuBackend::with_kernels(plan, kernels)
    }

    /// A backend running `kernels` (which must include every kernel of the plan's schedule).
    pub fn with_kernels(plan: &'a ExecutablePlan, kernels: EmuKernels) -> Result<EmuBackend<'a>> {
        KernelBackend::on(plan, kernels, "emu")
    }
}

impl HostBackend for EmuBackend<'_> {
    fn state(&self) -> &HostState {
        &self.seq
    }

    fn state_mut(&mut self) -> &mut HostState {
        &mut self.seq
    }

    fn run_step(&mut self, index: usize, tokens: &[u32], pos: usize) -> Result<()> {
        self.start_pass(tokens, pos, false)?;
        self.launch_step(index, tokens.len(), false)
    }
}
