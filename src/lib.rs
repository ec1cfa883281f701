//! fpx: a compiler for mixed-precision (FP8/FP4) inference plans of transformer LLMs.
//!
//! Pipeline (data flows one way): [`model`] ingests a checkpoint, [`ir`] builds an immutable
//! graph of the decoder, [`runtime::cpu`] executes it in FP32 with any linear layer
//! fake-quantized to a [`formats::Format`], and [`eval`] turns that into perplexity and KL
//! divergence on real text.

pub mod calib;
pub mod codegen;
pub mod error;
pub mod eval;
pub mod export;
pub mod formats;
pub mod fsutil;
pub mod ir;
pub mod latency;
pub mod limits;
pub mod lower;
pub mod model;
pub mod parsers;
pub mod plan;
pub mod runtime;
pub mod solve;

pub use error::{Error, Result};
