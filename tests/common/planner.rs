//! Helpers of the planner's CLI tests (`planner_cli`, `profile_cli`): synthetic
//! calibrations, and running `fpx` expecting success or failure.

use std::path::{Path, PathBuf};

use fpx::calib::Calibration;

use super::fpx;

/// A calibration of a SmolLM2-shaped model with `blocks` blocks and pseudo-random eps.
pub fn calibration(blocks: usize, with_kl: bool) -> Calibration {
    super::calib::synthetic(super::calib::smollm2_spec(blocks), with_kl, 12345)
}

pub fn write_calib(dir: &Path, blocks: usize, with_kl: bool) -> PathBuf {
    let path = dir.join("calib.json");
    calibration(blocks, with_kl).write(&path).unwrap();
    path
}

pub fn ok(args: &[&str]) -> String {
    let (code, out, err) = fpx(args);
    assert_eq!(code, 0, "fpx {args:?} failed:\n{err}");
    out
}

pub fn fails(args: &[&str]) -> String {
    let (code, _, err) = fpx(args);
    assert_ne!(code, 0, "fpx {args:?} should fail");
    err
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
