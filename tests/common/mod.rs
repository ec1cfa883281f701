//! Shared helpers of the integration tests: where the fetched data and the Python tools are,
//! and the skip-or-fail rule for tests that need them.

#![allow(dead_code)] // each test binary uses a different subset

use std::path::PathBuf;
use std::process::Command;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn smollm2() -> PathBuf {
    repo().join("data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

pub fn moby_dick() -> PathBuf {
    repo().join("data/text/moby-dick.txt")
}

/// Returns `true` when the resource exists. When it does not, a test that needs it is skipped
/// with a printed reason, or fails when FPX_REQUIRE_DATA=1 (the README's test command sets it).
pub fn have(what: &str, ok: bool) -> bool {
    if ok {
        return true;
    }
    if std::env::var("FPX_REQUIRE_DATA").is_ok_and(|v| v == "1") {
        panic!("{what} is missing and FPX_REQUIRE_DATA=1 (run `make fetch tools`)");
    }
    eprintln!("skipped: {what} is missing (run `make fetch tools`, or set FPX_REQUIRE_DATA=1 to fail instead)");
    false
}

/// The Python interpreter with numpy + gguf (FPX_PYTHON, else the project venv).
pub fn python() -> Option<PathBuf> {
    let p = std::env::var_os("FPX_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv/bin/python"));
    p.exists().then_some(p)
}

/// Runs `scripts/reference_ppl.py` and returns its JSON output.
pub fn reference_perplexity(
    python: &PathBuf,
    gguf: &std::path::Path,
    tokens: &std::path::Path,
    seq_len: usize,
    windows: usize,
) -> serde_json::Value {
    let out = Command::new(python)
        .arg(repo().join("scripts/reference_ppl.py"))
        .args(["--gguf".as_ref(), gguf.as_os_str()])
        .args(["--tokens".as_ref(), tokens.as_os_str()])
        .args([
            "--seq-len",
            &seq_len.to_string(),
            "--windows",
            &windows.to_string(),
        ])
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "reference_ppl.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("reference prints JSON")
}

/// Runs the `fpx` binary; returns (exit code, stdout, stderr).
pub fn fpx(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fpx"))
        .args(args)
        .output()
        .expect("fpx runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
