//! Helpers of the planner's CLI tests (`planner_cli`, `planner_w8a8`, `profile_cli`):
//! synthetic calibrations, a tiny checkpoint calibrated by `fpx calibrate`, and running `fpx`
//! expecting success or failure.

use std::path::{Path, PathBuf};

use fpx::calib::Calibration;

use super::fpx;

/// A calibration of a SmolLM2-shaped model with `blocks` blocks and pseudo-random eps.
pub fn calibration(blocks: usize, with_kl: bool) -> Calibration {
    super::calib::synthetic(super::calib::smollm2_spec(blocks), with_kl, 12345)
}

/// A tiny Llama checkpoint (`dir/tiny`), a text (`dir/text.txt`) and the calibration
/// `fpx calibrate` writes for them as `dir/name` (2 x 32 tokens; with `kl`, one held-out
/// window of 32 tokens and the extra flags `kl` holds): (model, text, calibration).
pub fn calibrate_tiny(dir: &Path, name: &str, kl: Option<&[&str]>) -> (PathBuf, PathBuf, PathBuf) {
    use fpx::model::synthetic::{tiny_spec, write_hf_checkpoint, HfDtype};
    let model = dir.join("tiny");
    let text = dir.join("text.txt");
    if !model.exists() {
        let spec = tiny_spec(fpx::model::Architecture::Llama);
        write_hf_checkpoint(&model, &spec, 7, HfDtype::F32, 1).unwrap();
        let words = [
            "the", "whale", "and", "sea", "ship", "is", "on", "at", "its", "captain",
        ];
        let body: Vec<&str> = (0..1500)
            .map(|i| words[(i * 7 + i / 3) % words.len()])
            .collect();
        std::fs::write(&text, body.join(" ")).unwrap();
    }
    let calib = dir.join(name);
    let kl_windows = if kl.is_some() { "1" } else { "0" };
    let args = [
        "calibrate",
        "--model",
        s(&model),
        "--text",
        s(&text),
        "--seq-len",
        "32",
        "--windows",
        "2",
        "--kl-windows",
        kl_windows,
        "--kl-seq-len",
        "32",
        "-o",
        s(&calib),
        "--json",
    ];
    ok(&[&args[..], kl.unwrap_or_default()].concat());
    (model, text, calib)
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
