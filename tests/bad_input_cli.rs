//! Hostile and careless command lines (issue 12), through the `fpx` binary: each asserts the
//! exit status (2 for what clap refuses, 1 for the rest), a message naming the flag, file or
//! tensor, no panic, and that no output (file, directory, temporary) is left behind.

mod common;

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;
use common::{edit_gguf, fpx, fpx_within, set_meta};
use fpx::model::synthetic::{tiny_spec, write_gguf, GgmlDType};
use fpx::model::Architecture;

struct Setup {
    dir: tempfile::TempDir,
    model: PathBuf,
    text: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.gguf");
    write_gguf(&model, &tiny_spec(Architecture::Llama), 1, GgmlDType::F32).unwrap();
    let text = dir.path().join("t.txt");
    std::fs::write(
        &text,
        "the quick brown fox jumps over the lazy dog. ".repeat(40),
    )
    .unwrap();
    Setup { dir, model, text }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs fpx, expects exit `code` and every needle in stderr, and no panic.
fn refused(code: i32, args: &[&str], needles: &[&str]) -> String {
    let (got, _, stderr) = fpx(args);
    assert_eq!(got, code, "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    for n in needles {
        assert!(stderr.contains(n), "{args:?}: expected `{n}` in: {stderr}");
    }
    stderr
}

/// The names in `dir`, sorted (to check nothing, not even a temporary, was left).
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn windows_longer_than_the_context_are_refused_before_allocating() {
    let t = setup();
    let (m, txt) = (s(&t.model), s(&t.text));
    refused(
        1,
        &["eval", "--model", m, "--text", txt, "--seq-len", "100000"],
        &[
            "--seq-len 100000 is longer than the model's context of 256 tokens",
            "m.gguf",
        ],
    );
    // A GGUF whose context_length is 4 does not evaluate 64-token windows.
    edit_gguf(
        &t.model,
        |meta| set_meta(meta, "llama.context_length", Value::U32(4)),
        None,
    );
    refused(
        1,
        &["eval", "--model", m, "--text", txt, "--seq-len", "64"],
        &["--seq-len 64 is longer than the model's context of 4 tokens"],
    );
}

#[test]
fn calibrate_checks_numbers_formats_and_its_output_before_working() {
    let t = setup();
    let (m, txt) = (s(&t.model), s(&t.text));
    let out = t.dir.path().join("c.json");
    let calibrate = |extra: &[&str]| {
        let mut a = vec!["calibrate", "--model", m, "--text", txt, "-o", s(&out)];
        a.extend_from_slice(extra);
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let cases: [(Vec<String>, &str); 4] = [
        (
            calibrate(&["--seq-len", "4294967296", "--windows", "4294967296"]),
            "--seq-len 4294967296 is longer than the model's context",
        ),
        (
            calibrate(&["--seq-len", "32", "--kl-seq-len", "1"]),
            "--kl-seq-len 1: a window needs at least 2",
        ),
        (
            calibrate(&["--formats", "fp8,fp8"]),
            "--formats: fp8 is listed twice",
        ),
        (
            calibrate(&["--seq-len", "40", "--windows", "1000000000000"]),
            "1000000000000 calibration windows of 40",
        ),
    ];
    for (args, expected) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        refused(1, &args, &[expected]);
        assert!(!out.exists());
    }
    // A directory, or a path under a file, as -o: refused before any work.
    let as_dir = t.dir.path().join("adir");
    std::fs::create_dir(&as_dir).unwrap();
    let under_file = t.text.join("c.json");
    for (o, expected) in [
        (&as_dir, "is a directory, expected a file path"),
        (&under_file, "t.txt"),
    ] {
        refused(
            1,
            &["calibrate", "--model", m, "--text", txt, "-o", s(o)],
            &[expected],
        );
    }
    assert!(names(&as_dir).is_empty());
}

#[test]
fn non_finite_and_out_of_range_numbers_are_refused_by_the_parser() {
    let t = setup();
    let m = s(&t.model);
    let calib =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/calibration/seed-two-layers");
    let c = s(&calib);
    let out = t.dir.path().join("p.json");
    let o = s(&out);
    for (args, expected) in [
        (
            vec![
                "run",
                "--model",
                m,
                "--prompt",
                "a",
                "--backend",
                "emu",
                "--check-kernels",
                "--tolerance",
                "nan",
            ],
            "--tolerance",
        ),
        (
            vec![
                "plan",
                "--calib",
                c,
                "--solver",
                "ilp",
                "--latency-budget",
                "inf",
                "-o",
                o,
            ],
            "inf is not a finite number",
        ),
        (
            vec![
                "plan", "--calib", c, "--solver", "greedy", "--gamma", "NaN", "-o", o,
            ],
            "NaN is not a finite number",
        ),
        (
            vec!["run", "--model", m, "--prompt", "a", "--max-tokens", "0"],
            "--max-tokens",
        ),
        (
            vec![
                "sweep",
                "--calib",
                c,
                "--points",
                "18446744073709551615",
                "-o",
                o,
            ],
            "--points",
        ),
        (
            vec!["sweep", "--calib", c, "--points", "10000000", "-o", o],
            "--points",
        ),
    ] {
        refused(2, &args, &[expected]);
    }
    assert!(!out.exists());
    refused(
        1,
        &[
            "run",
            "--model",
            m,
            "--prompt",
            "a",
            "--max-tokens",
            "18446744073709551615",
        ],
        &[
            "--max-tokens 18446744073709551615",
            "more than the model's context of 256",
        ],
    );
    refused(
        1,
        &["--threads", "100000", "inspect", m],
        &["--threads 100000 is more than this machine's"],
    );
}

#[test]
fn directory_outputs_are_staged_and_keep_the_previous_result() {
    let t = setup();
    let m = s(&t.model);
    let out = t.dir.path().join("kernels");
    let codegen = |extra: &[&str]| {
        let mut a = vec!["codegen", "--model", m, "--no-compile", "-o", s(&out)];
        a.extend_from_slice(extra);
        fpx(&a)
    };
    let (code, _, stderr) = codegen(&[]);
    assert_eq!(code, 0, "{stderr}");
    let manifest = std::fs::read(out.join("manifest.json")).unwrap();
    // A failing run (a plan for another model) leaves the previous result untouched and no
    // temporary beside it.
    let plan =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("plans/smollm2-ilp-gamma0.5-h100.plan.json");
    let (code, _, stderr) = codegen(&["--plan", s(&plan)]);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(std::fs::read(out.join("manifest.json")).unwrap(), manifest);
    let mut expected = vec!["kernels".to_string(), "m.gguf".into(), "t.txt".into()];
    expected.sort();
    assert_eq!(names(t.dir.path()), expected);
    // A folder of other files is never replaced.
    let other = t.dir.path().join("mine");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("notes.txt"), "keep").unwrap();
    refused(
        1,
        &["codegen", "--model", m, "--no-compile", "-o", s(&other)],
        &["mine", "not an earlier fpx output (no manifest.json)"],
    );
    assert_eq!(names(&other), vec!["notes.txt"]);
    // A sweep that fails after it started leaves nothing.
    let calib =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/calibration/seed-two-layers");
    let sweep_out = t.dir.path().join("sweep");
    refused(
        1,
        &[
            "sweep",
            "--calib",
            s(&calib),
            "--pins",
            s(&t.dir.path().join("missing.toml")),
            "-o",
            s(&sweep_out),
        ],
        &["missing.toml"],
    );
    assert!(!sweep_out.exists());
    assert!(!names(t.dir.path()).iter().any(|n| n.starts_with(".fpx")));
}

#[test]
fn eval_writes_its_token_file_only_after_it_succeeds() {
    let t = setup();
    let tokens = t.dir.path().join("tokens.json");
    let plan =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("plans/smollm2-ilp-gamma0.5-h100.plan.json");
    refused(
        1,
        &[
            "eval",
            "--model",
            s(&t.model),
            "--text",
            s(&t.text),
            "--seq-len",
            "32",
            "--plan",
            s(&plan),
            "--save-tokens",
            s(&tokens),
        ],
        &["smollm2-ilp-gamma0.5-h100.plan.json"],
    );
    assert!(!tokens.exists());
}

#[test]
fn messages_name_the_file_once_and_the_right_remedy() {
    let t = setup();
    // The OS error is printed once, not twice.
    let missing = t.dir.path().join("missing.gguf");
    let stderr = refused(1, &["inspect", s(&missing)], &["missing.gguf"]);
    assert_eq!(
        stderr.matches("No such file or directory").count(),
        1,
        "{stderr}"
    );
    // A 1-byte text names the text file.
    let tiny = t.dir.path().join("one-byte.txt");
    std::fs::write(&tiny, "a").unwrap();
    refused(
        1,
        &[
            "eval",
            "--model",
            s(&t.model),
            "--text",
            s(&tiny),
            "--seq-len",
            "16",
        ],
        &["one-byte.txt", "fewer than one window of 16"],
    );
    // `profile` has no CPU backend to suggest.
    if fpx::runtime::cuda::probe_driver().is_err() {
        let stderr = refused(
            1,
            &[
                "profile",
                "--model",
                s(&t.model),
                "-o",
                s(&t.dir.path().join("p.json")),
            ],
            &["no CUDA driver", "--device h100"],
        );
        assert!(!stderr.contains("--backend cpu"), "{stderr}");
    }
}

#[test]
fn fifos_and_non_finite_weights_fail_cleanly_through_the_cli() {
    let t = setup();
    let fifo = t.dir.path().join("pipe.txt");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let (code, _, stderr) = fpx_within(60, &["eval", "--model", s(&t.model), "--text", s(&fifo)])
        .expect("fpx hung on a FIFO");
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("pipe.txt") && stderr.contains("is a FIFO"),
        "{stderr}"
    );
    // A NaN in a weight: named with the tensor instead of "perplexity NaN".
    let mut bytes = std::fs::read(&t.model).unwrap();
    common::set_output_norm_value(&mut bytes, 0, f32::INFINITY);
    std::fs::write(&t.model, bytes).unwrap();
    refused(
        1,
        &[
            "eval",
            "--model",
            s(&t.model),
            "--text",
            s(&t.text),
            "--seq-len",
            "32",
        ],
        &[
            "m.gguf",
            "model.norm.weight (output_norm.weight)",
            "non-finite",
        ],
    );
}
