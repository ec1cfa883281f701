//! `fpx codegen --report`: what the GPU compiler made of each generated kernel, checked
//! without a GPU. For every entry point: registers, spill bytes, stack and static shared memory
//! from `ptxas -v` (the ptxas of the nvcc wheel, run on NVRTC's PTX for the same real target),
//! the widths of its global loads from the SASS of NVRTC's CUBIN (`cuobjdump -sass` of the
//! cuobjdump wheel), and the GPU-only paths the CUDA emulator cannot execute (native FP8/FP4
//! `cvt` instructions from inline PTX behind `__CUDA_ARCH__` guards; the emulator runs the
//! portable register decode instead). This module only runs those tools on bytes it is given.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use super::linear_ctx::GemvCtx;
use crate::error::{Error, Result};
use crate::lower::Arch;

/// Inline-PTX instructions that only the GPU runs, and what they stand for.
pub const GPU_ONLY: [(&str, &str); 2] = [
    ("cvt.rn.f16x2.e4m3x2", "native FP8 cvt"),
    ("cvt.rn.f16x2.e2m1x2", "native FP4 cvt"),
];

/// Paths of ptxas and cuobjdump.
#[derive(Debug, Clone)]
pub struct SassTools {
    pub ptxas: PathBuf,
    pub cuobjdump: PathBuf,
}

impl SassTools {
    /// `FPX_CUDA_BIN` (a directory with both), else the `.venv` wheels (nvidia/cuda_nvcc/bin,
    /// nvidia/cu13/bin or nvidia/cuda_cuobjdump/bin) of the current directory or this checkout.
    pub fn find() -> Result<SassTools> {
        let mut dirs: Vec<PathBuf> = Vec::new();
        if let Some(d) = std::env::var_os("FPX_CUDA_BIN").filter(|v| !v.is_empty()) {
            dirs.push(PathBuf::from(d));
        }
        for site in crate::fsutil::venv_site_packages() {
            for sub in ["cuda_nvcc/bin", "cu13/bin", "cuda_cuobjdump/bin"] {
                dirs.push(site.join("nvidia").join(sub));
            }
        }
        let find = |tool: &'static str| {
            dirs.iter()
                .map(|d| d.join(tool))
                .find(|p| p.is_file())
                .ok_or_else(|| Error::CudaUnavailable {
                    what: "CUDA binary tools",
                    hint: format!(
                        "{tool} not found (wheels nvidia-cuda-nvcc-cu12, nvidia-cuda-cuobjdump); \
                         run `make tools` or set FPX_CUDA_BIN"
                    ),
                })
        };
        Ok(SassTools {
            ptxas: find("ptxas")?,
            cuobjdump: find("cuobjdump")?,
        })
    }
}

/// Resources and load widths of one entry point.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KernelReport {
    pub entry: String,
    pub arch: String,
    pub registers: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
    pub stack_bytes: u32,
    /// Static shared memory (dynamic shared memory is set at launch).
    pub shared_bytes: u32,
    /// Global loads by width in bits (128, 64, 32; 16 and 8 for sub-word loads).
    pub global_loads: BTreeMap<u32, u32>,
    /// GPU-only paths of this kernel that the emulator replaces by its portable fallback.
    pub emulator_cannot_run: Vec<String>,
    /// The kernel's largest loop (the body of its longest backward branch), if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub main_loop: Option<MainLoop>,
    /// Static count of the SASS instructions of each class of [`MIX`] (FP32 FMA, tensor-core
    /// MMA, ldmatrix, async copies, global and shared loads and stores, shuffles).
    #[serde(default)]
    pub mix: BTreeMap<String, u32>,
}

/// The SASS mnemonics the instruction mix counts: FFMA (FP32 FMA), HMMA (16-bit MMA), QMMA and
/// OMMA (FP8 / FP4 MMA), LDSM (ldmatrix), LDGSTS (cp.async), LDG / STG, LDS / STS, SHFL.
pub const MIX: [&str; 11] = [
    "FFMA", "HMMA", "QMMA", "OMMA", "LDSM", "LDGSTS", "LDG", "STG", "LDS", "STS", "SHFL",
];

/// The mnemonic of a SASS instruction without predicate and modifiers (`@P0 LDG.E.128 ...`
/// -> `LDG`).
fn mnemonic(ins: &str) -> Option<&str> {
    let op = ins.split_whitespace().find(|t| !t.starts_with('@'))?;
    op.split('.').next()
}

/// The body of a kernel's main loop in SASS: what one trip of it issues.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct MainLoop {
    /// SASS instructions of one trip (the branch included).
    pub instructions: u32,
    /// Global loads among them.
    pub global_loads: u32,
}

impl MainLoop {
    /// The largest loop of one function's SASS, given as (address, instruction) in order: the
    /// span from a backward branch's target to the branch.
    fn find(code: &[(u32, String)]) -> Option<MainLoop> {
        let target = |ins: &str| -> Option<u32> {
            let t = ins.split("BRA").nth(1)?.split(';').next()?.trim();
            u32::from_str_radix(t.strip_prefix("0x")?, 16).ok()
        };
        code.iter()
            .filter_map(|(addr, ins)| {
                let to = target(ins).filter(|&t| t < *addr)?;
                let body = code.iter().filter(|(a, _)| (to..=*addr).contains(a));
                let (n, loads) = body.fold((0, 0), |(n, l), (_, i)| {
                    (
                        n + 1,
                        l + u32::from(i.split_whitespace().any(|t| t.starts_with("LDG"))),
                    )
                });
                Some(MainLoop {
                    instructions: n,
                    global_loads: loads,
                })
            })
            .max_by_key(|l| l.instructions)
    }
}

impl KernelReport {
    pub fn loads(&self, bits: u32) -> u32 {
        self.global_loads.get(&bits).copied().unwrap_or(0)
    }
    /// Static count of instruction class `op` ([`MIX`]).
    pub fn count(&self, op: &str) -> u32 {
        self.mix.get(op).copied().unwrap_or(0)
    }
    pub fn spills(&self) -> u32 {
        self.spill_store_bytes + self.spill_load_bytes
    }
}

fn tool_err(tool: &Path, reason: String) -> Error {
    Error::Codegen {
        kernel: "(report)".into(),
        reason: format!("{}: {reason}", tool.display()),
    }
}

fn number_before(line: &str, unit: &str) -> Option<u32> {
    let i = line.find(unit)?;
    line[..i].split_whitespace().last()?.parse().ok()
}

/// Analyses one compiled kernel module (`ptx` and `cubin` of the same source and arch).
pub fn analyze(
    tools: &SassTools,
    arch: Arch,
    ptx: &str,
    cubin: &[u8],
) -> Result<Vec<KernelReport>> {
    let dir = tempfile::tempdir().map_err(|e| tool_err(&tools.ptxas, e.to_string()))?;
    let (ptx_path, cubin_path) = (dir.path().join("k.ptx"), dir.path().join("k.cubin"));
    std::fs::write(&ptx_path, ptx).map_err(|e| Error::io(&ptx_path, e))?;
    std::fs::write(&cubin_path, cubin).map_err(|e| Error::io(&cubin_path, e))?;
    let run = |tool: &Path, args: &[&std::ffi::OsStr]| -> Result<String> {
        let out = Command::new(tool)
            .args(args)
            .output()
            .map_err(|e| tool_err(tool, e.to_string()))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            return Err(tool_err(tool, text));
        }
        Ok(text)
    };
    let gpu = format!("-arch={}", arch.name());
    let out = dir.path().join("ptxas.cubin");
    let info = run(
        &tools.ptxas,
        &[
            "-v".as_ref(),
            gpu.as_ref(),
            ptx_path.as_os_str(),
            "-o".as_ref(),
            out.as_os_str(),
        ],
    )?;
    let mut reports: Vec<KernelReport> = Vec::new();
    for line in info.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let entry = rest.split('\'').next().unwrap_or_default().to_string();
            reports.push(KernelReport {
                entry,
                arch: arch.name().to_string(),
                ..KernelReport::default()
            });
        } else if let Some(r) = reports.last_mut() {
            if line.contains("spill stores") {
                r.stack_bytes = number_before(line, "bytes stack frame").unwrap_or(0);
                r.spill_store_bytes = number_before(line, "bytes spill stores").unwrap_or(0);
                r.spill_load_bytes = number_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("registers") {
                r.registers = number_before(line, "registers").unwrap_or(0);
                r.shared_bytes = number_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    let sass = run(
        &tools.cuobjdump,
        &["-sass".as_ref(), cubin_path.as_os_str()],
    )?;
    let mut current: Option<usize> = None;
    // Per entry point, its instructions as (address, text).
    let mut code: Vec<Vec<(u32, String)>> = vec![Vec::new(); reports.len()];
    for line in sass.lines() {
        if let Some(name) = line.split("Function : ").nth(1) {
            current = reports.iter().position(|r| r.entry == name.trim());
            continue;
        }
        if let (Some(i), Some(addr)) = (current, sass_address(line)) {
            let ins = line
                .split("*/")
                .nth(1)
                .unwrap_or_default()
                .trim()
                .to_string();
            if let Some(op) = mnemonic(&ins).filter(|op| MIX.contains(op)) {
                *reports[i].mix.entry(op.to_string()).or_insert(0) += 1;
            }
            code[i].push((addr, ins));
        }
        let (Some(i), Some(op)) = (
            current,
            line.split_whitespace().find(|t| t.starts_with("LDG")),
        ) else {
            continue;
        };
        let bits = if op.contains(".128") {
            128
        } else if op.contains(".64") {
            64
        } else if op.contains("8") {
            8
        } else if op.contains("16") {
            16
        } else {
            32
        };
        *reports[i].global_loads.entry(bits).or_insert(0) += 1;
    }
    let gaps: Vec<String> = GPU_ONLY
        .iter()
        .filter(|(ins, _)| ptx.contains(ins))
        .map(|(ins, what)| format!("{what} ({ins})"))
        .collect();
    for (r, code) in reports.iter_mut().zip(&code) {
        r.emulator_cannot_run = gaps.clone();
        r.main_loop = MainLoop::find(code);
    }
    Ok(reports)
}

/// SASS instructions the `_m1` GEMV issues per weight element in its main loop (FMA, loads,
/// decode, scales, loop overhead): one trip reads one weight vector of `epv` elements, its
/// `epv / xv` activation vectors (W8A8: one vector of x's codes) and, for FP4, one scale per
/// segment, so the trips the
/// compiler unrolled into the body are its global loads divided by those.
pub fn gemv_instructions_per_weight(report: &KernelReport, gemv: &GemvCtx) -> Option<f64> {
    let main = report.main_loop?;
    // One weight load, then x's: one vector of codes (W8A8) or EPV / XV activation loads.
    let x_loads = if gemv.w8a8 {
        1
    } else {
        gemv.epv.div_ceil(gemv.xv)
    };
    let per_trip = 1 + x_loads + if gemv.block > 0 { gemv.segs } else { 0 };
    let trips = main.global_loads as usize / per_trip;
    (trips > 0 && (main.global_loads as usize).is_multiple_of(per_trip))
        .then(|| main.instructions as f64 / (trips * gemv.epv) as f64)
}

/// The address of a SASS instruction line (`        /*0140*/   LDG.E.128 ...`).
fn sass_address(line: &str) -> Option<u32> {
    let rest = line.trim_start().strip_prefix("/*")?;
    let (hex, _) = rest.split_once("*/")?;
    u32::from_str_radix(hex, 16).ok()
}

/// The report as a text table.
pub fn table(reports: &[KernelReport]) -> String {
    let mut s = format!(
        "{:<44} {:<8} {:>4} {:>6} {:>6} {:>7} {:>6} {:>5} {:>5} {:>5} {:>5} {:>5} {:>5} {:>6}  {}\n",
        "kernel",
        "arch",
        "regs",
        "spill",
        "stack",
        "smem",
        "ldg128",
        "ldg64",
        "ldg32",
        "ldg<32",
        "ffma",
        "mma",
        "ldsm",
        "ldgsts",
        "emulator cannot run"
    );
    for r in reports {
        let small = r.loads(16) + r.loads(8);
        s.push_str(&format!(
            "{:<44} {:<8} {:>4} {:>6} {:>6} {:>7} {:>6} {:>5} {:>5} {:>5} {:>5} {:>5} {:>5} {:>6}  {}\n",
            r.entry,
            r.arch,
            r.registers,
            r.spills(),
            r.stack_bytes,
            r.shared_bytes,
            r.loads(128),
            r.loads(64),
            r.loads(32),
            small,
            r.count("FFMA"),
            r.count("HMMA") + r.count("QMMA") + r.count("OMMA"),
            r.count("LDSM"),
            r.count("LDGSTS"),
            if r.emulator_cannot_run.is_empty() {
                "-".to_string()
            } else {
                r.emulator_cannot_run.join(", ")
            }
        ));
    }
    s
}
