//! Shared helpers of the integration tests: where the fetched data and the Python tools are,
//! and the skip-or-fail rule for tests that need them.

#![allow(dead_code)] // each test binary uses a different subset

pub mod calib;
pub mod emu_probe;
pub mod planner;

use std::path::PathBuf;
use std::process::Command;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::QTensor;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn smollm2() -> PathBuf {
    repo().join("data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

pub fn moby_dick() -> PathBuf {
    repo().join("data/text/moby-dick.txt")
}

/// Whether a GPU is usable; prints why not, or panics under FPX_REQUIRE_GPU=1.
pub fn gpu() -> bool {
    match fpx::runtime::cuda::probe_driver() {
        Ok(_) => true,
        Err(e) => {
            if std::env::var("FPX_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("FPX_REQUIRE_GPU=1 but no GPU is usable: {e}");
            }
            eprintln!("skipped: {e} (set FPX_REQUIRE_GPU=1 to fail instead)");
            false
        }
    }
}

/// Returns `true` when the resource exists. When it does not, a test that needs it is skipped
/// with a `SKIPPED <test>: <reason>` line in the `cargo test` output (passing tests included),
/// or fails when FPX_REQUIRE_DATA=1 (the README's test command sets it).
pub fn have(what: &str, ok: bool) -> bool {
    if ok {
        return true;
    }
    if std::env::var("FPX_REQUIRE_DATA").is_ok_and(|v| v == "1") {
        panic!("{what} is missing and FPX_REQUIRE_DATA=1 (run `make fetch tools`)");
    }
    // Written to the process's stderr directly, not through `eprintln!`, which the test
    // harness captures and shows only for failing tests: a skip must be visible in the
    // `cargo test` output of a passing run.
    use std::io::Write as _;
    let test = std::thread::current().name().unwrap_or("?").to_string();
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: {what} is missing (run `make fetch tools`, or set FPX_REQUIRE_DATA=1 to fail instead)"
    );
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

/// Runs the `fpx` binary like [`fpx`], but kills it after `seconds` (an input that makes
/// fpx hang fails the test instead of hanging the suite); `None` when it was killed.
pub fn fpx_within(seconds: u64, args: &[&str]) -> Option<(i32, String, String)> {
    use std::io::Read;
    let mut child = Command::new(env!("CARGO_BIN_EXE_fpx"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("fpx runs");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let (mut out, mut err) = (String::new(), String::new());
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    Some((status.code().unwrap_or(-1), out, err))
}

/// The mixed plan of the backend tests: FP8 q/k/v and lm_head, FP16 o_proj, NVFP4 gate/up,
/// MXFP4 down (every kernel format in one plan).
pub fn mixed_precision(graph: &fpx::ir::Graph) -> fpx::lower::PrecisionMap {
    use fpx::formats::Format;
    use fpx::ir::LinearKind;
    let mut map = fpx::lower::PrecisionMap::new();
    for (id, l) in graph.linears() {
        let f = match l.kind {
            LinearKind::Gate | LinearKind::Up => Format::Nvfp4,
            LinearKind::Down => Format::Mxfp4,
            LinearKind::O => Format::Fp16,
            _ => Format::Fp8,
        };
        map.insert(
            graph.node(id).name.clone(),
            fpx::lower::LinearPrecision::weight_only(f),
        );
    }
    map
}

/// Largest |got - want| relative to max |want| (infinite where `got` is NaN).
pub fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "lengths");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    got.iter()
        .zip(want)
        .map(|(g, w)| {
            if g.is_nan() {
                f32::INFINITY
            } else {
                (g - w).abs() / scale
            }
        })
        .fold(0.0, f32::max)
}

/// A backend under test next to the cpu backend on the mixed plan of `model_path`, with
/// activations in the checkpoint's type (as `fpx run` executes it): the prompt's prefill
/// logits within `logit_tol` of the largest logit (at 16 bits: or within four units in the last
/// place of the largest logit, as the two backends' summation orders can move any stored value
/// to a neighbouring 16-bit number, and such moves add up over the layers), then `n` greedy
/// tokens identical.
/// `prompt`: text, or 11 fixed token ids. `new_backend` makes a fresh backend.
pub fn compare_with_cpu<F>(
    model_path: &std::path::Path,
    prompt: Option<&str>,
    n: usize,
    logit_tol: f32,
    new_backend: F,
) where
    F: Fn(&fpx::runtime::exec::ExecutablePlan) -> Box<dyn fpx::runtime::exec::Backend + '_>,
{
    use fpx::runtime::exec::{generate, Backend, CpuBackend, ExecutablePlan};
    let model = fpx::model::load_model(model_path).unwrap();
    let graph = fpx::ir::Graph::build(&model.spec);
    let prompt: Vec<u32> = match prompt {
        Some(t) => model.tokenizer.encode(t).unwrap(),
        None => (0..11u32)
            .map(|i| (i * 31 + 7) % model.spec.vocab_size as u32)
            .collect(),
    };
    let plan = ExecutablePlan::build(
        &graph,
        model.weights.as_ref(),
        &mixed_precision(&graph),
        prompt.len() + n,
        fpx::lower::ActDtype::of_checkpoint(&graph, model.weights.as_ref()),
    )
    .unwrap();
    let (mut cpu, mut other) = (CpuBackend::new(&plan), new_backend(&plan));
    cpu.forward(&prompt, 0).unwrap();
    other.forward(&prompt, 0).unwrap();
    let err = rel_err(&other.logits().unwrap(), &cpu.logits().unwrap());
    let logit_tol = logit_tol.max(4.0 * plan.schedule.act.ulp());
    assert!(
        err <= logit_tol,
        "{} prefill logits: relative error {err}",
        other.name()
    );
    let (mut cpu, mut other) = (CpuBackend::new(&plan), new_backend(&plan));
    let t0 = std::time::Instant::now();
    let want = generate(&mut cpu, &prompt, n, &[]).unwrap();
    let t1 = std::time::Instant::now();
    let got = generate(other.as_mut(), &prompt, n, &[]).unwrap();
    eprintln!(
        "{} ({} activations): {} prompt tokens, {n} new; logits rel err {err:.2e}; cpu {:.2}s, {} {:.2}s",
        model_path.file_name().unwrap().to_string_lossy(),
        plan.schedule.act,
        prompt.len(),
        (t1 - t0).as_secs_f64(),
        other.name(),
        t1.elapsed().as_secs_f64()
    );
    // Equal greedy tokens, except that the first difference may be a near tie: at 16 bits two
    // backends that sum in different orders can swap two logits closer than the tolerance (the
    // cpu backend's logits there decide; after it the sequences differ, so the check stops).
    if let Some(i) = (0..n.min(got.tokens.len()).min(want.tokens.len()))
        .find(|&i| got.tokens[i] != want.tokens[i])
    {
        let mut context = prompt.clone();
        context.extend_from_slice(&want.tokens[..i]);
        let mut cpu = CpuBackend::new(&plan);
        cpu.forward(&context, 0).unwrap();
        let logits = cpu.logits().unwrap();
        let scale = logits.iter().fold(0f32, |m, v| m.max(v.abs()));
        let (w, g) = (
            logits[want.tokens[i] as usize],
            logits[got.tokens[i] as usize],
        );
        assert!(
            plan.schedule.act != fpx::lower::ActDtype::F32 && w - g <= logit_tol * scale,
            "greedy tokens {} vs cpu differ at {i}: {:?} vs {:?}, cpu logits {w} vs {g} (not a \
             near tie within {logit_tol} of {scale})",
            other.name(),
            got.tokens,
            want.tokens
        );
        eprintln!(
            "{}: token {i} is a near tie at {} ({w} vs {g}); the sequences part there",
            other.name(),
            plan.schedule.act
        );
    }
}

/// Rewrite a GGUF through candle's reader and writer, editing metadata and tensors.
pub fn edit_gguf(
    path: &std::path::Path,
    edit_meta: impl Fn(&mut Vec<(String, Value)>),
    drop_tensor: Option<&str>,
) {
    let mut f = std::fs::File::open(path).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let mut meta: Vec<(String, Value)> = content.metadata.clone().into_iter().collect();
    meta.sort_by(|a, b| a.0.cmp(&b.0));
    edit_meta(&mut meta);
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let tensors: Vec<(String, QTensor)> = names
        .into_iter()
        .filter(|n| Some(n.as_str()) != drop_tensor)
        .map(|n| {
            (
                n.clone(),
                content
                    .tensor(&mut f, n, &candle_core::Device::Cpu)
                    .unwrap(),
            )
        })
        .collect();
    drop(f);
    let mut out = std::fs::File::create(path).unwrap();
    let m: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut out, &m, &t).unwrap();
}

pub fn set_meta(meta: &mut [(String, Value)], key: &str, value: Value) {
    meta.iter_mut().find(|(k, _)| k == key).unwrap().1 = value;
}

/// config.json of a tiny Llama: hidden 64, 2 layers, 4 heads / 2 KV heads, vocab 300 (the
/// synthetic tokenizer's), context 256.
pub fn tiny_llama_config() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 300,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "bos_token_id": 0,
        "eos_token_id": 0
    })
}

/// Overwrites element `element` of `model.norm.weight` with `value` in the bytes of a tiny
/// Llama checkpoint written with seed 1 and FP32 storage (found by its first 4 values).
pub fn set_output_norm_value(bytes: &mut [u8], element: usize, value: f32) {
    let spec = fpx::model::synthetic::tiny_spec(fpx::model::Architecture::Llama);
    let norm = fpx::model::synthetic::random_weights(&spec, 1)
        .into_iter()
        .find(|(n, _)| n == "model.norm.weight")
        .unwrap()
        .1;
    let first: Vec<u8> = norm.data[..4]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let at = bytes.windows(16).position(|w| w == first).unwrap() + 4 * element;
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
}

/// The tiny Qwen3 spec (q/k norms, no biases) with a sliding window of 6 positions on its
/// second layer only: both attention kernels, windowed and full, in one model.
pub fn tiny_qwen3_windowed() -> fpx::model::ModelSpec {
    fpx::model::ModelSpec {
        sliding_window: Some(fpx::model::SlidingWindow {
            size: 6,
            layers: vec![1],
        }),
        ..fpx::model::synthetic::tiny_spec(fpx::model::Architecture::Qwen3)
    }
}

/// `text` with `from` replaced by `to`, which must occur exactly once (so a template edit that
/// moves the line fails here rather than silently testing an unbroken kernel).
pub fn break_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(text.matches(from).count(), 1, "`{from}` must occur once");
    text.replace(from, to)
}

/// The embedded template or header `name` of `list` (`codegen::TEMPLATES`, `HEADERS`).
pub fn embedded(list: &[(&'static str, &'static str)], name: &str) -> &'static str {
    list.iter().find(|(n, _)| *n == name).unwrap().1
}
