//! The one error type of the fpx library.
//!
//! Every variant carries the context a user needs to act on it: the file path, the tensor or
//! layer name, and what was expected. The CLI (`main.rs`) prints these through `anyhow` and
//! exits non-zero; the library never panics on user input.

use std::path::PathBuf;

/// Result alias used across the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: invalid model config: {reason}")]
    Config { path: PathBuf, reason: String },

    #[error("{path}: unsupported architecture `{arch}` (supported: {supported})")]
    UnsupportedArchitecture {
        path: PathBuf,
        arch: String,
        supported: &'static str,
    },

    #[error("{path}: missing tensor `{tensor}`")]
    MissingTensor { path: PathBuf, tensor: String },

    #[error("{path}: tensor `{tensor}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("{path}: tensor `{tensor}` has unsupported type {dtype}")]
    UnsupportedDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },

    #[error("{path}: tensor `{tensor}`: {reason}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        reason: String,
    },

    #[error("{path}: corrupt or truncated file: {reason}")]
    Corrupt { path: PathBuf, reason: String },

    #[error("{path}: tokenizer: {reason}")]
    Tokenizer { path: PathBuf, reason: String },

    #[error("{path}: text: {reason}")]
    Text { path: PathBuf, reason: String },

    #[error("unknown format `{name}` (expected one of: fp16, fp8, nvfp4, mxfp4)")]
    UnknownFormat { name: String },

    #[error("layer `{layer}`: {reason}")]
    Layer { layer: String, reason: String },

    #[error("{path}: {what}: {reason}")]
    File {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },

    #[error("invalid {what}: {reason}")]
    InvalidArgument { what: &'static str, reason: String },

    #[error("codegen of kernel `{kernel}`: {reason}")]
    Codegen { kernel: String, reason: String },

    #[error("NVRTC could not compile kernel `{kernel}` for {arch} (source dumped to {source_path}; options: {options})\n{log}")]
    Nvrtc {
        kernel: String,
        arch: String,
        options: String,
        source_path: PathBuf,
        log: String,
    },

    /// A CUDA library (NVRTC, the driver) cannot be loaded on this machine.
    #[error("{what}: {hint}")]
    CudaUnavailable { what: &'static str, hint: String },

    #[error("CUDA {call} failed: {reason}")]
    Cuda { call: String, reason: String },

    /// The CUDA emulator (host C++ build of the generated kernels) failed at `stage`.
    #[error("CUDA emulator ({stage}): {reason}")]
    Emu { stage: String, reason: String },

    /// A planning problem with no assignment meeting its constraints; `reason` says which
    /// constraint binds and what is achievable.
    #[error("infeasible: {reason}")]
    Infeasible { reason: String },

    /// The MIP solver failed for a reason other than infeasibility.
    #[error("solver: {reason}")]
    Solver { reason: String },
}

impl Error {
    /// An I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn invalid(what: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            what,
            reason: reason.into(),
        }
    }
}
