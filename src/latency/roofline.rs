//! Analytic roofline latency of named GPUs.
//!
//! A linear layer `y = x W^T` with `W` of `N x K` run for `M` tokens (the batch) moves
//! `Format::weight_bytes(N, K)` bytes of weights (codes + scales, exactly as stored), its
//! input (`2 M K` bytes of FP16, or `a.weight_bytes(M, K)` when the activations are quantized
//! to `a`: the same codes and scales per row or block) and `2 M N` bytes of FP16 output, and
//! performs `2 M N K` flops. Its roofline time is
//! `max(bytes / HBM bandwidth, flops / peak(precision)) + launch overhead`.
//!
//! `peak(precision)`: the tensor-core product takes both operands in one type, so
//! weight-only layers run at the FP16 rate (the weights are converted on the way in);
//! quantized activations run at the rate of the wider of the two formats: FP8 at the FP8
//! rate, NVFP4/MXFP4 x FP4 at the FP4 rate on architectures with FP4 tensor cores (Blackwell:
//! sm_100, sm_120) and at the FP16 rate elsewhere (DESIGN.md). All peaks are dense (no 2:4
//! sparsity). The model is optimistic (peak bandwidth, no cache effects, no dequantisation
//! cost) and ranks formats by the bytes they move, which is what decode at small batch is
//! bound by; a measured profile replaces it when one exists.
//!
//! The fixed part of a step, which no plan changes: per decoder block, attention reading an
//! FP16 KV cache of `context` tokens for each of the `batch` sequences
//! (`4 * batch * context * kv_dim` bytes, `4 * batch * context * q_dim` flops) plus six more
//! kernel launches (two RMSNorms, RoPE, SiLU-multiply, two residual adds). The embedding
//! gather and lm_head are not counted (lm_head is not in the calibration's layers).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::formats::Format;
use crate::ir::LinearKind;
use crate::lower::LinearPrecision;

use super::{LatencyModel, LatencySource, LayerShape};

/// GPUs with a built-in roofline. A closed set: an enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Gpu {
    H100,
    H200,
    B200,
    Rtx5090,
    L40s,
    Rtx4090,
    A100,
    Rtx3090,
}

/// Hardware figures of one GPU. FLOP/s are dense tensor-core peaks.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct GpuSpec {
    /// Short name, as `--device` takes it.
    pub name: &'static str,
    /// Full name.
    pub full_name: &'static str,
    /// CUDA architecture (`sm_90`, ...).
    pub arch: &'static str,
    /// Peak DRAM bandwidth, bytes/s.
    pub bandwidth: f64,
    /// FP32 FLOP/s on the CUDA cores (SIMT FMA, not tensor cores).
    pub fp32_flops: f64,
    /// Dense FP16 tensor FLOP/s (FP32 accumulate).
    pub fp16_flops: f64,
    /// Dense FP8 tensor FLOP/s (FP32 accumulate).
    pub fp8_flops: f64,
    /// Dense FP4 tensor FLOP/s, where the architecture has FP4 tensor cores.
    pub fp4_flops: Option<f64>,
    /// Seconds added per kernel launch.
    pub launch_overhead: f64,
    /// The link tensor-parallel GPUs of this kind all-reduce over.
    pub interconnect: Interconnect,
}

/// The GPU-to-GPU link of a tensor-parallel group.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Interconnect {
    pub name: &'static str,
    /// Bytes/s per direction per GPU.
    pub bandwidth: f64,
    /// Seconds of fixed cost per all-reduce (an estimate of NCCL / custom all-reduce latency
    /// for the small messages of decode, not a datasheet figure).
    pub latency: f64,
}

/// NVLink 4 (H100/H200 SXM): 900 GB/s per GPU, both directions together (datasheets).
const NVLINK4: Interconnect = Interconnect {
    name: "NVLink 4",
    bandwidth: 450e9,
    latency: 5e-6,
};
/// NVLink 5 (B200): 1.8 TB/s per GPU, both directions together (HGX B200 datasheet).
const NVLINK5: Interconnect = Interconnect {
    name: "NVLink 5",
    bandwidth: 900e9,
    latency: 5e-6,
};
/// PCIe 5.0 x16: 64 GB/s per direction (RTX 5090: no NVLink).
const PCIE5: Interconnect = Interconnect {
    name: "PCIe 5.0 x16",
    bandwidth: 64e9,
    latency: 15e-6,
};
/// NVLink 3 (A100 SXM4): 600 GB/s per GPU, both directions together (A100 datasheet).
const NVLINK3: Interconnect = Interconnect {
    name: "NVLink 3",
    bandwidth: 300e9,
    latency: 5e-6,
};
/// PCIe 4.0 x16: 32 GB/s per direction (L40S datasheet: 64 GB/s bidirectional; RTX 4090).
const PCIE4: Interconnect = Interconnect {
    name: "PCIe 4.0 x16",
    bandwidth: 32e9,
    latency: 15e-6,
};

const TB: f64 = 1e12;
const TFLOPS: f64 = 1e12;
/// Per-kernel launch overhead: a typical gap between consecutive kernels of a decode step
/// replayed from a CUDA graph (not a datasheet figure; override with
/// [`Roofline::with_launch_overhead`]).
const LAUNCH: f64 = 2e-6;

impl Gpu {
    pub const ALL: [Gpu; 8] = [
        Gpu::H100,
        Gpu::H200,
        Gpu::B200,
        Gpu::Rtx5090,
        Gpu::L40s,
        Gpu::Rtx4090,
        Gpu::A100,
        Gpu::Rtx3090,
    ];

    /// The GPU's figures, with their sources.
    pub fn spec(self) -> GpuSpec {
        match self {
            // NVIDIA H100 Tensor Core GPU datasheet, SXM5 column: 3.35 TB/s HBM3;
            // FP16 tensor 1,979 TFLOPS and FP8 3,958 TFLOPS "with sparsity" -> half dense.
            Gpu::H100 => GpuSpec {
                name: "h100",
                full_name: "NVIDIA H100 SXM5 80GB",
                arch: "sm_90",
                bandwidth: 3.35 * TB,
                // FP32 67 TFLOPS (SXM5 datasheet).
                fp32_flops: 66.9 * TFLOPS,
                fp16_flops: 989.5 * TFLOPS,
                fp8_flops: 1979.0 * TFLOPS,
                fp4_flops: None,
                launch_overhead: LAUNCH,
                interconnect: NVLINK4,
            },
            // NVIDIA H200 Tensor Core GPU datasheet, SXM column: 4.8 TB/s HBM3e; same tensor
            // cores as H100 SXM (FP16 1,979 / FP8 3,958 TFLOPS with sparsity).
            Gpu::H200 => GpuSpec {
                name: "h200",
                full_name: "NVIDIA H200 SXM 141GB",
                arch: "sm_90",
                bandwidth: 4.8 * TB,
                // FP32 67 TFLOPS (SXM datasheet).
                fp32_flops: 66.9 * TFLOPS,
                fp16_flops: 989.5 * TFLOPS,
                fp8_flops: 1979.0 * TFLOPS,
                fp4_flops: None,
                launch_overhead: LAUNCH,
                interconnect: NVLINK4,
            },
            // NVIDIA HGX B200 datasheet (8 GPUs): 64 TB/s HBM3e, FP4 144 PFLOPS, FP8 72
            // PFLOPS, FP16 36 PFLOPS, all with sparsity -> per GPU dense: 8 TB/s, 9 / 4.5 /
            // 2.25 PFLOPS.
            Gpu::B200 => GpuSpec {
                name: "b200",
                full_name: "NVIDIA B200 180GB (HGX)",
                arch: "sm_100a",
                bandwidth: 8.0 * TB,
                // FP32 600 TFLOPS for 8 GPUs (HGX B200 datasheet).
                fp32_flops: 75.0 * TFLOPS,
                fp16_flops: 2250.0 * TFLOPS,
                fp8_flops: 4500.0 * TFLOPS,
                fp4_flops: Some(9000.0 * TFLOPS),
                launch_overhead: LAUNCH,
                interconnect: NVLINK5,
            },
            // NVIDIA RTX Blackwell GPU architecture whitepaper, GeForce RTX 5090: 1,792 GB/s
            // GDDR7; 3,352 "AI TOPS" = FP4 with sparsity -> 1,676 dense; FP8 838 dense, FP16
            // 419 dense (FP16 accumulate); GeForce halves FP32-accumulate FP16/FP8 -> 209.5
            // and 419 (FP4 taken at its dense figure).
            Gpu::Rtx5090 => GpuSpec {
                name: "rtx5090",
                full_name: "NVIDIA GeForce RTX 5090 32GB",
                arch: "sm_120a",
                bandwidth: 1.792 * TB,
                // FP32 104.8 TFLOPS (RTX Blackwell whitepaper).
                fp32_flops: 104.8 * TFLOPS,
                fp16_flops: 209.5 * TFLOPS,
                fp8_flops: 419.0 * TFLOPS,
                fp4_flops: Some(1676.0 * TFLOPS),
                launch_overhead: LAUNCH,
                interconnect: PCIE5,
            },
            // NVIDIA L40S datasheet: 864 GB/s GDDR6; FP16 tensor 362.05 TFLOPS dense (733
            // with sparsity); FP8 733 TFLOPS dense (1,466 with sparsity).
            Gpu::L40s => GpuSpec {
                name: "l40s",
                full_name: "NVIDIA L40S 48GB",
                arch: "sm_89",
                bandwidth: 0.864 * TB,
                // FP32 91.6 TFLOPS (L40S datasheet).
                fp32_flops: 91.6 * TFLOPS,
                fp16_flops: 362.05 * TFLOPS,
                fp8_flops: 733.0 * TFLOPS,
                fp4_flops: None,
                launch_overhead: LAUNCH,
                interconnect: PCIE4,
            },
            // NVIDIA Ada Lovelace architecture whitepaper, appendix, GeForce RTX 4090:
            // 1,008 GB/s GDDR6X; FP16 tensor with FP32 accumulate 165.2 TFLOPS dense; FP8
            // with FP32 accumulate 330.3 TFLOPS dense.
            Gpu::Rtx4090 => GpuSpec {
                name: "rtx4090",
                full_name: "NVIDIA GeForce RTX 4090 24GB",
                arch: "sm_89",
                bandwidth: 1.008 * TB,
                // FP32 82.6 TFLOPS (Ada whitepaper).
                fp32_flops: 82.6 * TFLOPS,
                fp16_flops: 165.2 * TFLOPS,
                fp8_flops: 330.3 * TFLOPS,
                fp4_flops: None,
                launch_overhead: LAUNCH,
                interconnect: PCIE4,
            },
            // NVIDIA A100 Tensor Core GPU datasheet, 80GB SXM column: 2,039 GB/s HBM2e; FP16
            // tensor 312 TFLOPS dense (624 with sparsity); FP32 19.5 TFLOPS. No FP8 or FP4
            // tensor cores: FP8 and FP4 weights run on the 16-bit ones after decoding.
            Gpu::A100 => GpuSpec {
                name: "a100",
                full_name: "NVIDIA A100 SXM4 80GB",
                arch: "sm_80",
                bandwidth: 2.039 * TB,
                fp32_flops: 19.5 * TFLOPS,
                fp16_flops: 312.0 * TFLOPS,
                fp8_flops: 312.0 * TFLOPS,
                fp4_flops: None,
                launch_overhead: LAUNCH,
                interconnect: NVLINK3,
            },
            // NVIDIA Ampere GA102 whitepaper, GeForce RTX 3090: 936 GB/s GDDR6X; FP16 tensor
            // with FP32 accumulate 71 TFLOPS dense (142 with sparsity); FP32 35.6 TFLOPS. No
            // FP8 or FP4 tensor cores (as the A100).
            Gpu::Rtx3090 => GpuSpec {
                name: "rtx3090",
                full_name: "NVIDIA GeForce RTX 3090 24GB",
                arch: "sm_86",
                bandwidth: 0.936 * TB,
                fp32_flops: 35.6 * TFLOPS,
                fp16_flops: 71.0 * TFLOPS,
                fp8_flops: 71.0 * TFLOPS,
                fp4_flops: None,
                launch_overhead: LAUNCH,
                interconnect: PCIE4,
            },
        }
    }

    /// The GPU a CUDA device name (`NVIDIA H100 80GB HBM3`, `NVIDIA GeForce RTX 4090`) is, when
    /// it is one of [`Gpu::ALL`].
    pub fn of_device_name(name: &str) -> Option<Gpu> {
        let n: String = name
            .to_ascii_lowercase()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect();
        let n = n.strip_prefix("nvidia").unwrap_or(&n);
        let n = n.strip_prefix("geforce").unwrap_or(n);
        Gpu::ALL.into_iter().find(|g| n.starts_with(g.spec().name))
    }

    /// Parses a device name (`h100`, `H100-SXM`, `rtx4090`, `4090`, ...).
    pub fn parse(name: &str) -> Result<Gpu> {
        let n: String = name
            .to_ascii_lowercase()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect();
        let n = n.strip_prefix("nvidia").unwrap_or(&n);
        let n = n.strip_prefix("geforce").unwrap_or(n);
        let gpu = match n {
            "h100" | "h100sxm" | "h100sxm5" => Gpu::H100,
            "h200" | "h200sxm" => Gpu::H200,
            "b200" => Gpu::B200,
            "rtx5090" | "5090" => Gpu::Rtx5090,
            "l40s" => Gpu::L40s,
            "rtx4090" | "4090" => Gpu::Rtx4090,
            "a100" | "a100sxm" | "a100sxm4" | "a100sxm480gb" => Gpu::A100,
            "rtx3090" | "3090" => Gpu::Rtx3090,
            _ => {
                let known: Vec<&str> = Gpu::ALL.iter().map(|g| g.spec().name).collect();
                return Err(Error::invalid(
                    "--device",
                    format!(
                        "`{name}` is neither a known GPU ({}) nor a profile file",
                        known.join(", ")
                    ),
                ));
            }
        };
        Ok(gpu)
    }
}

impl GpuSpec {
    /// These figures with another per-kernel launch overhead (seconds, finite, >= 0).
    pub fn with_launch_overhead(mut self, seconds: f64) -> Result<GpuSpec> {
        if !(seconds.is_finite() && seconds >= 0.0) {
            return Err(Error::invalid(
                "launch overhead",
                format!("{seconds}: must be a finite number of seconds >= 0"),
            ));
        }
        self.launch_overhead = seconds;
        Ok(self)
    }

    /// The tensor-core rate a layer with weights in `format` computes at.
    pub fn peak_flops(&self, format: Format) -> f64 {
        match format {
            Format::Fp16 => self.fp16_flops,
            Format::Fp8 => self.fp8_flops,
            Format::Nvfp4 | Format::Mxfp4 => self.fp4_flops.unwrap_or(self.fp16_flops),
        }
    }
}

/// The roofline latency model of one GPU at one batch size and context length.
#[derive(Debug, Clone, PartialEq)]
pub struct Roofline {
    pub gpu: Gpu,
    pub spec: GpuSpec,
    /// Tokens per step (sequences decoding one token each).
    pub batch: usize,
    /// Context length each sequence attends to.
    pub context: usize,
}

impl Roofline {
    /// The roofline of `gpu` for steps of `batch` tokens over `context` tokens of context.
    pub fn new(gpu: Gpu, batch: usize, context: usize) -> Result<Roofline> {
        if batch == 0 {
            return Err(Error::invalid(
                "--batch",
                "0: a step has at least one token",
            ));
        }
        Ok(Roofline {
            gpu,
            spec: gpu.spec(),
            batch,
            context,
        })
    }

    /// Replaces the per-kernel launch overhead (seconds).
    pub fn with_launch_overhead(mut self, seconds: f64) -> Result<Roofline> {
        self.spec = self.spec.with_launch_overhead(seconds)?;
        Ok(self)
    }

    /// Bytes one step of `layer` moves in `precision`.
    pub fn bytes(&self, layer: &LayerShape, precision: LinearPrecision) -> f64 {
        let (m, n, k) = (self.batch, layer.out_features, layer.in_features);
        let input = match precision.activations {
            Some(a) => a.weight_bytes(m, k) as f64,
            None => 2.0 * (m * k) as f64,
        };
        precision.weights.weight_bytes(n, k) as f64 + input + 2.0 * (m * n) as f64
    }

    /// Flops of one step of `layer`.
    pub fn flops(&self, layer: &LayerShape) -> f64 {
        2.0 * self.batch as f64 * layer.out_features as f64 * layer.in_features as f64
    }
}

impl LatencyModel for Roofline {
    fn source(&self) -> LatencySource {
        LatencySource::Roofline {
            device: self.spec.name.to_string(),
            device_name: self.spec.full_name.to_string(),
            batch: self.batch,
            context: self.context,
        }
    }

    fn latency(&self, layer: &LayerShape, precision: LinearPrecision) -> Result<f64> {
        let memory = self.bytes(layer, precision) / self.spec.bandwidth;
        // Both operands in one type: the wider of the two (Format orders widest first).
        let product = precision
            .activations
            .map_or(Format::Fp16, |a| a.min(precision.weights));
        let compute = self.flops(layer) / self.spec.peak_flops(product);
        Ok(memory.max(compute) + self.spec.launch_overhead)
    }

    fn fixed_latency(&self, layers: &[LayerShape]) -> f64 {
        let mut blocks = std::collections::BTreeMap::<usize, (usize, usize)>::new();
        for l in layers {
            let e = blocks.entry(l.layer).or_default();
            match l.kind {
                LinearKind::Q => e.0 = l.out_features,
                LinearKind::K => e.1 = l.out_features,
                _ => {}
            }
        }
        let (b, c) = (self.batch as f64, self.context as f64);
        blocks
            .values()
            .map(|&(q_dim, kv_dim)| {
                let bytes = 4.0 * b * c * kv_dim as f64 + 4.0 * b * q_dim as f64;
                let flops = 4.0 * b * c * q_dim as f64;
                let attention = (bytes / self.spec.bandwidth).max(flops / self.spec.fp16_flops);
                attention + 7.0 * self.spec.launch_overhead
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(out: usize, inp: usize) -> LayerShape {
        LayerShape {
            name: "model.layers.0.mlp.down_proj".into(),
            layer: 0,
            kind: LinearKind::Down,
            out_features: out,
            in_features: inp,
        }
    }

    #[test]
    fn cuda_device_names_map_to_gpus() {
        assert_eq!(
            Gpu::of_device_name("NVIDIA H100 80GB HBM3"),
            Some(Gpu::H100)
        );
        assert_eq!(Gpu::of_device_name("NVIDIA H200"), Some(Gpu::H200));
        assert_eq!(
            Gpu::of_device_name("NVIDIA GeForce RTX 4090"),
            Some(Gpu::Rtx4090)
        );
        assert_eq!(
            Gpu::of_device_name("NVIDIA A100-SXM4-80GB"),
            Some(Gpu::A100)
        );
        assert_eq!(Gpu::of_device_name("Tesla V100-SXM2-16GB"), None);
    }

    #[test]
    fn decode_is_bandwidth_bound_and_counts_exact_bytes() {
        let r = Roofline::new(Gpu::H100, 1, 0).unwrap();
        let l = shape(576, 1536);
        for f in Format::ALL {
            let want =
                (f.weight_bytes(576, 1536) as f64 + 2.0 * (576.0 + 1536.0)) / 3.35e12 + LAUNCH;
            let got = r.latency(&l, LinearPrecision::weight_only(f)).unwrap();
            assert!((got - want).abs() < 1e-15, "{f}: {got} vs {want}");
        }
        // W8A8 reads the input as FP8 codes and one FP32 scale per row.
        let want = (Format::Fp8.weight_bytes(576, 1536) as f64 + 1536.0 + 4.0 + 2.0 * 576.0)
            / 3.35e12
            + LAUNCH;
        let got = r.latency(&l, LinearPrecision::both(Format::Fp8)).unwrap();
        assert!((got - want).abs() < 1e-15, "w8a8: {got} vs {want}");
        let t = |f| r.latency(&l, LinearPrecision::weight_only(f)).unwrap();
        assert!(t(Format::Nvfp4) < t(Format::Fp8) && t(Format::Fp8) < t(Format::Fp16));
        // MXFP4 stores fewer scale bytes than NVFP4.
        assert!(t(Format::Mxfp4) < t(Format::Nvfp4));
    }

    #[test]
    fn large_batches_are_compute_bound_at_the_rate_of_both_operands() {
        let l = shape(4096, 4096);
        let h100 = Roofline::new(Gpu::H100, 8192, 0).unwrap();
        let b200 = Roofline::new(Gpu::B200, 8192, 0).unwrap();
        let flops = 2.0 * 8192.0 * 4096.0 * 4096.0;
        let both = LinearPrecision::both;
        // Hopper has no FP4 tensor cores: W4A4 runs at the FP16 rate, slower than W8A8.
        let h = |p| h100.latency(&l, p).unwrap() - LAUNCH;
        assert!((h(both(Format::Nvfp4)) - flops / 989.5e12).abs() < 1e-12);
        assert!(h(both(Format::Nvfp4)) > h(both(Format::Fp8)));
        // Weight-only layers compute in 16 bits whatever their weights.
        let fp8_weights = h(LinearPrecision::weight_only(Format::Fp8));
        assert!((fp8_weights - flops / 989.5e12).abs() < 1e-12);
        // Blackwell computes FP4 natively at twice its FP8 rate.
        let b = |p| b200.latency(&l, p).unwrap() - LAUNCH;
        assert!((b(both(Format::Nvfp4)) - flops / 9000e12).abs() < 1e-12);
        assert!((b(both(Format::Fp8)) / b(both(Format::Nvfp4)) - 2.0).abs() < 1e-9);
        // FP8 weights with NVFP4 activations: at the FP8 rate, the wider operand's.
        let mixed = LinearPrecision {
            weights: Format::Fp8,
            activations: Some(Format::Nvfp4),
        };
        assert!((b(mixed) - b(both(Format::Fp8))).abs() < 1e-12);
    }

    #[test]
    fn fixed_latency_grows_with_context() {
        let mut q = shape(576, 576);
        q.kind = LinearKind::Q;
        let mut k = shape(192, 576);
        k.kind = LinearKind::K;
        let layers = [q, k];
        let short = Roofline::new(Gpu::H100, 1, 0).unwrap();
        let long = Roofline::new(Gpu::H100, 1, 4096).unwrap();
        assert!(long.fixed_latency(&layers) > short.fixed_latency(&layers));
        let want = 4.0 * 4096.0 * 192.0 / 3.35e12 + 4.0 * 576.0 / 3.35e12 + 7.0 * LAUNCH;
        assert!((long.fixed_latency(&layers) - want).abs() < 1e-15);
    }

    #[test]
    fn device_names_parse_and_unknown_ones_are_listed() {
        assert_eq!(Gpu::parse("H100-SXM").unwrap(), Gpu::H100);
        assert_eq!(Gpu::parse("NVIDIA GeForce RTX 4090").unwrap(), Gpu::Rtx4090);
        for g in Gpu::ALL {
            assert_eq!(Gpu::parse(g.spec().name).unwrap(), g);
        }
        let e = Gpu::parse("v100").unwrap_err().to_string();
        assert!(
            e.contains("v100") && e.contains("h100") && e.contains("rtx3090"),
            "{e}"
        );
        assert!(Roofline::new(Gpu::H100, 0, 0).is_err());
    }
}
