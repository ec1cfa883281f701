//! Code generation: a plan's kernels as CUDA C++ sources. Pure strings; nothing here loads
//! CUDA (compilation with NVRTC and execution live in `runtime::cuda`).
//!
//! It sits above [`crate::lower`] and below `runtime`: [`Schedule::build`] (in `lower`) turns
//! the IR graph and a precision map into the ordered steps of a forward pass, each bound to
//! [`KernelSpec`]s (op family + shapes + format: the dedupe key); [`KernelContext`] computes, in Rust, every number a template
//! prints (tile sizes, vector widths, lanes per row, scale layouts, launch dimensions); the
//! [`Renderer`] prints them through the Tera templates of `templates/` (one per op family plus
//! `macros.cu.tera`), which include the hand-written helpers of `kernels/*.cuh`.
//! [`generate`] renders every distinct kernel of a schedule for one [`Arch`], sorted by spec,
//! so the output is deterministic.

pub mod context;
pub mod linear_ctx;
pub mod manifest;
mod render;
pub mod report;

pub use context::{KernelContext, Launch};
pub use manifest::Manifest;
pub use render::{HelperHeaders, KernelSource, Renderer, HEADERS, TEMPLATES};

use crate::error::Result;
#[cfg(doc)]
use crate::lower::KernelSpec;
use crate::lower::{Arch, Schedule};

/// Every kernel of `schedule` rendered for `arch`, sorted by spec (each spec once).
pub fn generate(schedule: &Schedule, arch: Arch) -> Result<Vec<KernelSource>> {
    schedule.check_kernels()?;
    let renderer = Renderer::new()?;
    schedule
        .kernels()
        .iter()
        .map(|spec| renderer.render(spec, arch))
        .collect()
}
