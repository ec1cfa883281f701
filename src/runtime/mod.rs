//! Execution backends. `cpu` is the reference interpreter of the schedule (each linear layer's
//! weights, and optionally activations, fake-quantized to the format a precision map assigns,
//! [`crate::lower::PrecisionMap`]); `exec` pairs a schedule with packed weights and runs it on
//! the cpu backend or, through the one [`launch::Launcher`], on `cuda` and `emu`.

pub mod cpu;
pub mod cuda;
pub mod emu;
pub mod exec;
pub mod launch;
mod loaded;

pub use loaded::LoadedKernels;
