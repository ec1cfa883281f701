//! Target GPU architectures, as data: the NVRTC target name and which conversion instructions
//! the chip has. Kernels are compiled to CUBIN for these real targets (only a real target runs
//! ptxas, which rejects instructions the chip lacks).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A real GPU target the generated kernels are compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Arch {
    /// Ampere data-center (A100, A30): BF16/FP16 tensor cores, no FP8 or FP4 conversions
    /// (both decoded by bit manipulation, the path the emulator runs everywhere).
    #[serde(rename = "sm_80")]
    Sm80,
    /// Ampere consumer and workstation (RTX 30xx, A10, A40): as sm_80.
    #[serde(rename = "sm_86")]
    Sm86,
    /// Ada (L4, L40S, RTX 40xx): FP8 conversions, no FP4.
    #[serde(rename = "sm_89")]
    Sm89,
    /// Hopper (H100, H200): FP8 conversions, no FP4.
    #[serde(rename = "sm_90")]
    Sm90,
    /// Blackwell data-center (B200), arch-specific features: native E2M1 conversion.
    #[serde(rename = "sm_100a")]
    Sm100a,
    /// Blackwell consumer (RTX 50xx), arch-specific features: native E2M1 conversion.
    #[serde(rename = "sm_120a")]
    Sm120a,
}

impl Arch {
    pub const ALL: [Arch; 6] = [
        Arch::Sm80,
        Arch::Sm86,
        Arch::Sm89,
        Arch::Sm90,
        Arch::Sm100a,
        Arch::Sm120a,
    ];

    /// The NVRTC `--gpu-architecture` value.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Sm80 => "sm_80",
            Arch::Sm86 => "sm_86",
            Arch::Sm89 => "sm_89",
            Arch::Sm90 => "sm_90",
            Arch::Sm100a => "sm_100a",
            Arch::Sm120a => "sm_120a",
        }
    }

    /// Compute capability (major, minor) of the chips this target runs on.
    pub fn compute_capability(self) -> (u32, u32) {
        match self {
            Arch::Sm80 => (8, 0),
            Arch::Sm86 => (8, 6),
            Arch::Sm89 => (8, 9),
            Arch::Sm90 => (9, 0),
            Arch::Sm100a => (10, 0),
            Arch::Sm120a => (12, 0),
        }
    }

    /// The target for a device of this compute capability, if fpx supports it.
    pub fn from_compute_capability(major: u32, minor: u32) -> Option<Arch> {
        Arch::ALL
            .into_iter()
            .find(|a| a.compute_capability() == (major, minor))
    }

    /// How the kernels reach a device of compute capability `major.minor`: compiled for its
    /// own target when fpx has one; for any other device of compute capability 9.0 or newer
    /// (a chip newer than every target, or a Blackwell variant such as 10.3 that the
    /// arch-specific `a` targets do not run on), the PTX of sm_90 (the newest target without
    /// arch-specific features, so its PTX is forward compatible) for the driver to compile;
    /// for another 8.x device (e.g. 8.7, Jetson Orin) the PTX of sm_80; `None` before 8.0
    /// (no BF16 tensor cores).
    pub fn for_device(major: u32, minor: u32) -> Option<DeviceTarget> {
        match Arch::from_compute_capability(major, minor) {
            Some(a) => Some(DeviceTarget::Cubin(a)),
            None if (major, minor) >= Arch::Sm90.compute_capability() => {
                Some(DeviceTarget::Ptx(Arch::Sm90))
            }
            None if (major, minor) >= Arch::Sm80.compute_capability() => {
                Some(DeviceTarget::Ptx(Arch::Sm80))
            }
            None => None,
        }
    }

    /// `cvt.rn.f16x2.e4m3x2` exists (sm_89 and newer).
    pub fn has_fp8_cvt(self) -> bool {
        !matches!(self, Arch::Sm80 | Arch::Sm86)
    }

    /// `mma.sync.m16n8k32` on E4M3 operands exists (sm_89 and newer, as the conversion).
    pub fn has_fp8_mma(self) -> bool {
        self.has_fp8_cvt()
    }

    /// That `mma.sync` runs on FP8 tensor cores (SASS `QMMA`: sm_89, sm_120a). On sm_90 and
    /// sm_100a ptxas lowers it to unpacks to f16 and `HMMA` (their FP8 rate is reached by
    /// `wgmma` / `tcgen05`, which fpx does not generate), so it runs at the 16-bit rate
    /// (`tests/sass.rs`, `sass_w8a8_gemm_instruction`).
    pub fn fp8_mma_is_native(self) -> bool {
        matches!(self, Arch::Sm89 | Arch::Sm120a)
    }

    /// `cvt.rn.f16x2.e2m1x2` exists (the arch-specific Blackwell targets only).
    pub fn has_fp4_cvt(self) -> bool {
        matches!(self, Arch::Sm100a | Arch::Sm120a)
    }
}

/// What a device loads: CUBIN compiled for its own target, or a target's PTX that the driver
/// compiles for it (just in time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceTarget {
    Cubin(Arch),
    Ptx(Arch),
}

impl DeviceTarget {
    /// The target the kernels are rendered and compiled for.
    pub fn arch(self) -> Arch {
        match self {
            DeviceTarget::Cubin(a) | DeviceTarget::Ptx(a) => a,
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Arch {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Arch::ALL
            .into_iter()
            .find(|a| a.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                Error::invalid(
                    "GPU architecture",
                    format!("`{s}` (supported: sm_80, sm_86, sm_89, sm_90, sm_100a, sm_120a)"),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_capabilities() {
        for a in Arch::ALL {
            assert_eq!(a.name().parse::<Arch>().unwrap(), a);
            let (major, minor) = a.compute_capability();
            assert_eq!(Arch::from_compute_capability(major, minor), Some(a));
            let json = serde_json::to_string(&a).unwrap();
            assert_eq!(json, format!("\"{}\"", a.name()));
        }
        assert!("sm_75".parse::<Arch>().is_err());
        // Own targets load CUBIN; newer chips and Blackwell variants the `a` targets do not
        // run on get sm_90's PTX for the JIT; older chips are refused.
        assert_eq!(
            Arch::for_device(9, 0),
            Some(DeviceTarget::Cubin(Arch::Sm90))
        );
        assert_eq!(
            Arch::for_device(12, 0),
            Some(DeviceTarget::Cubin(Arch::Sm120a))
        );
        for (major, minor) in [(12, 1), (10, 3), (11, 0), (13, 0), (9, 1)] {
            assert_eq!(
                Arch::for_device(major, minor),
                Some(DeviceTarget::Ptx(Arch::Sm90)),
                "{major}.{minor}"
            );
        }
        assert_eq!(
            Arch::for_device(8, 6),
            Some(DeviceTarget::Cubin(Arch::Sm86))
        );
        assert_eq!(Arch::for_device(8, 7), Some(DeviceTarget::Ptx(Arch::Sm80)));
        assert_eq!(Arch::for_device(7, 5), None);
        assert!(Arch::Sm120a.has_fp4_cvt() && !Arch::Sm90.has_fp4_cvt());
        assert!(Arch::Sm89.has_fp8_cvt() && !Arch::Sm86.has_fp8_cvt() && !Arch::Sm80.has_fp8_cvt());
    }
}
