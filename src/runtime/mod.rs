//! Execution backends. `cpu` is the FP32 reference: it runs the IR with each linear layer's
//! weights (and optionally activations) fake-quantized to the format a precision map assigns
//! ([`crate::lower::PrecisionMap`]).

pub mod cpu;
pub mod cuda;
pub mod emu;
pub mod exec;
mod loaded;

pub use loaded::LoadedKernels;
