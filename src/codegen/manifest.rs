//! The manifest `fpx codegen` writes next to the sources: which kernels a plan needs, the
//! files of each (source, CUBIN, PTX), their entry points and launch block size, and which
//! kernels each linear layer runs. Paths are relative to the manifest's directory.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::render::KernelSource;
use super::report::KernelReport;
use crate::lower::Arch;
use crate::lower::Schedule;
use crate::lower::{KernelSpec, WeightFormat};

/// Schema version of the manifest file.
pub const MANIFEST_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub schema_version: u32,
    pub fpx_version: String,
    pub arch: Arch,
    /// e.g. "NVRTC 12.9"; `None` when only sources were written.
    pub compiler: Option<String>,
    /// NVRTC options every kernel was compiled with.
    pub options: Vec<String>,
    /// Helper headers, relative paths (the include directory NVRTC was given).
    pub headers: Vec<String>,
    pub kernels: Vec<ManifestKernel>,
    pub layers: Vec<ManifestLayer>,
    /// Per entry point: registers, spills, shared memory, load widths (`fpx codegen --report`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sass: Option<Vec<KernelReport>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestKernel {
    pub name: String,
    pub family: String,
    pub spec: KernelSpec,
    pub source: String,
    /// Hex SHA-256 of the source text.
    pub source_sha256: String,
    pub entry_points: Vec<String>,
    pub threads: u32,
    pub cubin: Option<String>,
    pub ptx: Option<String>,
    /// The CUBIN came from the disk cache.
    pub cached: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestLayer {
    pub name: String,
    pub format: WeightFormat,
    pub n: usize,
    pub k: usize,
    pub gemv: String,
    pub gemm: String,
}

impl Manifest {
    /// A manifest of `kernels` (sources only; callers fill in compiled files).
    pub fn new(arch: Arch, schedule: &Schedule, kernels: &[KernelSource]) -> Manifest {
        let kernels = kernels
            .iter()
            .map(|k| ManifestKernel {
                name: k.name.clone(),
                family: k.spec.family().to_string(),
                spec: k.spec,
                source: k.file_name.clone(),
                source_sha256: format!("{:x}", Sha256::digest(k.source.as_bytes())),
                entry_points: k.entry_points.clone(),
                threads: k.context.launch(1, 1).block.0,
                cubin: None,
                ptx: None,
                cached: None,
            })
            .collect();
        let layers = (schedule.linears.iter().enumerate())
            .map(|(i, l)| {
                // An expert runs in its projection's grouped GEMV, decode and prefill alike.
                let (gemv, gemm) = match schedule.expert_of(i) {
                    Some((moe, p)) => {
                        let name = schedule.expert_kernel(moe, p).name();
                        (name.clone(), name)
                    }
                    None => (
                        KernelSpec::Gemv(l.shape).name(),
                        KernelSpec::Gemm(l.shape).name(),
                    ),
                };
                ManifestLayer {
                    name: l.name.clone(),
                    format: l.shape.format,
                    n: l.shape.n,
                    k: l.shape.k,
                    gemv,
                    gemm,
                }
            })
            .collect();
        Manifest {
            schema_version: MANIFEST_VERSION,
            fpx_version: env!("CARGO_PKG_VERSION").to_string(),
            arch,
            compiler: None,
            options: Vec::new(),
            headers: super::HEADERS
                .iter()
                .map(|(name, _)| format!("include/{name}"))
                .collect(),
            kernels,
            layers,
            sass: None,
        }
    }
}
