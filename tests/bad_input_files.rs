//! Hostile and careless input files (issue 12), through the library: each test makes its own
//! bad file from a valid synthetic one, and asserts a typed error naming the file and the
//! field or tensor, with no panic. Counts that would allocate without bound are asserted
//! as refused before allocating (the message states the limit or what the file holds).

mod common;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use candle_core::quantized::gguf_file::Value;
use common::{edit_gguf, set_meta};
use fpx::model::synthetic::{tiny_spec, write_gguf, write_hf_checkpoint, GgmlDType, HfDtype};
use fpx::model::{load_model, Architecture};

fn gguf(dir: &Path) -> PathBuf {
    let path = dir.join("model.gguf");
    write_gguf(&path, &tiny_spec(Architecture::Llama), 1, GgmlDType::F32).unwrap();
    path
}

/// The error of loading `path`, as printed, which must name `path` and every `needle`.
fn refused(path: &Path, needles: &[&str]) -> String {
    let msg = match load_model(path) {
        Ok(_) => panic!("{} loaded but should not have", path.display()),
        Err(e) => e.to_string(),
    };
    assert!(
        msg.contains(&path.display().to_string()),
        "no path in: {msg}"
    );
    for n in needles {
        assert!(msg.contains(n), "expected `{n}` in: {msg}");
    }
    msg
}

/// Byte positions in a GGUF's tensor-info entry of `name`: (dims, type, offset).
fn tensor_info(bytes: &[u8], name: &str) -> (usize, usize, usize) {
    let mut needle = (name.len() as u64).to_le_bytes().to_vec();
    needle.extend(name.as_bytes());
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or_else(|| panic!("no tensor info for {name}"));
    let n_dims_at = at + needle.len();
    let n_dims = u32::from_le_bytes(bytes[n_dims_at..n_dims_at + 4].try_into().unwrap()) as usize;
    let dims_at = n_dims_at + 4;
    let type_at = dims_at + 8 * n_dims;
    (dims_at, type_at, type_at + 4)
}

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

fn patch(path: &Path, edit: impl FnOnce(&mut Vec<u8>)) {
    let mut bytes = std::fs::read(path).unwrap();
    edit(&mut bytes);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn huge_layer_counts_are_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let path = gguf(dir.path());
    // Within the layer limit (the expected-tensor list stays small): the first tensor the
    // file lacks is named.
    edit_gguf(
        &path,
        |m| set_meta(m, "llama.block_count", Value::U32(4000)),
        None,
    );
    refused(
        &path,
        &["missing tensor `model.layers.2.input_layernorm.weight`"],
    );
    // Beyond any real model (2^40, as u64): refused by the limit.
    edit_gguf(
        &path,
        |m| set_meta(m, "llama.block_count", Value::U64(1 << 40)),
        None,
    );
    refused(
        &path,
        &["num_layers is 1099511627776, more than the limit of 4096"],
    );
    // The same for a Hugging Face config (10^9 layers).
    let hf = dir.path().join("hf");
    write_hf_checkpoint(&hf, &tiny_spec(Architecture::Llama), 1, HfDtype::F16, 1).unwrap();
    let config = hf.join("config.json");
    edit_json(&config, |v| {
        v["num_hidden_layers"] = serde_json::json!(1_000_000_000)
    });
    refused(&hf, &["config.json", "num_layers is 1000000000"]);
}

#[test]
fn huge_metadata_arrays_are_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big-array.gguf");
    // 5M one-byte elements (5 MB on disk, ~160 MB as parsed values): over the limit.
    let n: u64 = 5_000_000;
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes()); // tensors
    b.extend(1u64.to_le_bytes()); // metadata entries
    b.extend(3u64.to_le_bytes());
    b.extend(b"big");
    b.extend(9u32.to_le_bytes()); // array
    b.extend(0u32.to_le_bytes()); // of u8
    b.extend(n.to_le_bytes());
    b.resize(b.len() + n as usize, 7);
    std::fs::write(&path, b).unwrap();
    refused(
        &path,
        &["metadata `big`: array length is 5000000, more than the limit of 4194304"],
    );
}

#[test]
fn overflowing_shapes_are_refused_with_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = gguf(dir.path());
    patch(&path, |b| {
        let (dims, _, _) = tensor_info(b, "output_norm.weight");
        b[dims..dims + 8].copy_from_slice(&(1u64 << 62).to_le_bytes());
    });
    refused(
        &path,
        &["tensor `output_norm.weight` has an impossible shape"],
    );
    // heads x head_dim overflowing usize, in GGUF metadata and in a config.
    let path = gguf(dir.path());
    edit_gguf(
        &path,
        |m| set_meta(m, "llama.attention.key_length", Value::U64(1 << 62)),
        None,
    );
    refused(&path, &["num_heads x head_dim", "overflows"]);
    let hf = dir.path().join("hf");
    write_hf_checkpoint(&hf, &tiny_spec(Architecture::Llama), 1, HfDtype::F16, 1).unwrap();
    let config = hf.join("config.json");
    edit_json(&config, |v| v["head_dim"] = serde_json::json!(1u64 << 62));
    refused(&hf, &["config.json", "num_heads x head_dim", "overflows"]);
}

#[test]
fn overlapping_and_unaligned_tensors_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = gguf(dir.path());
    patch(&path, |b| {
        let (_, _, a) = tensor_info(b, "blk.0.attn_norm.weight");
        let (_, _, f) = tensor_info(b, "blk.0.ffn_norm.weight");
        let offset = read_u64(b, a);
        b[f..f + 8].copy_from_slice(&offset.to_le_bytes());
    });
    refused(
        &path,
        &["blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "overlap"],
    );
    let path = gguf(dir.path());
    patch(&path, |b| {
        let (_, _, f) = tensor_info(b, "blk.0.ffn_norm.weight");
        let offset = read_u64(b, f) + 4;
        b[f..f + 8].copy_from_slice(&offset.to_le_bytes());
    });
    refused(
        &path,
        &[
            "tensor `blk.0.ffn_norm.weight`",
            "not a multiple of the alignment 32",
        ],
    );
}

#[test]
fn duplicate_metadata_keys_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = gguf(dir.path());
    edit_gguf(
        &path,
        |m| m.push(("llama.context_length".into(), Value::U32(4))),
        None,
    );
    refused(
        &path,
        &["metadata key `llama.context_length` appears twice"],
    );
}

#[test]
fn non_finite_weights_are_named_with_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = gguf(dir.path());
    patch(&path, |b| common::set_output_norm_value(b, 1, f32::NAN));
    let model = load_model(&path).unwrap();
    let msg = model
        .weights
        .tensor("model.norm.weight")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("model.gguf"), "{msg}");
    assert!(
        msg.contains("model.norm.weight (output_norm.weight)")
            && msg.contains("1 non-finite values")
            && msg.contains("element 1"),
        "{msg}"
    );
}

/// Runs `f` on a thread and fails the test if it takes longer than 20 s (a hang).
fn within<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || tx.send(f()).unwrap());
    rx.recv_timeout(Duration::from_secs(20))
        .expect("hung: no answer within 20 s")
}

fn mkfifo(path: &Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn fifos_are_refused_by_name_instead_of_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("model.gguf");
    mkfifo(&fifo);
    let f = fifo.clone();
    let msg = within(move || load_model(&f).unwrap_err().to_string());
    assert!(
        msg.contains("model.gguf") && msg.contains("is a FIFO, not a regular file"),
        "{msg}"
    );
    let f = fifo.clone();
    let msg = within(move || fpx::eval::load_text(&f).unwrap_err().to_string());
    assert!(msg.contains("is a FIFO"), "{msg}");
    // Inside a text directory, named with its path.
    let texts = dir.path().join("texts");
    std::fs::create_dir(&texts).unwrap();
    std::fs::write(texts.join("a.txt"), "some text").unwrap();
    mkfifo(&texts.join("pipe.txt"));
    let msg = within(move || fpx::eval::load_text(&texts).unwrap_err().to_string());
    assert!(
        msg.contains("pipe.txt") && msg.contains("is a FIFO"),
        "{msg}"
    );
}

#[test]
fn symlink_loops_in_a_text_directory_end_and_read_each_file_once() {
    let dir = tempfile::tempdir().unwrap();
    let texts = dir.path().join("texts");
    std::fs::create_dir_all(texts.join("sub")).unwrap();
    std::fs::write(texts.join("a.txt"), "alpha").unwrap();
    std::fs::write(texts.join("sub/b.txt"), "beta").unwrap();
    // Two loops (a link to the root and one to its parent folder) and a second name for
    // a file.
    std::os::unix::fs::symlink(&texts, texts.join("sub/loop")).unwrap();
    std::os::unix::fs::symlink(texts.join("sub"), texts.join("sub/self")).unwrap();
    std::os::unix::fs::symlink(texts.join("a.txt"), texts.join("z-again.txt")).unwrap();
    let t = texts.clone();
    let text = within(move || fpx::eval::load_text(&t).unwrap());
    assert_eq!(text, "alpha\n\nbeta");
}

#[test]
fn bad_calibrations_are_refused_with_the_layer() {
    let dir = tempfile::tempdir().unwrap();
    let seed = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/calibration/seed-two-layers"),
    )
    .unwrap();
    let base: serde_json::Value = serde_json::from_slice(&seed).unwrap();
    type Edit = fn(&mut serde_json::Value);
    let cases: [(&str, Edit, &str); 3] = [
        (
            "huge.json",
            |v| v["layers"][0]["in_features"] = serde_json::json!(1_000_000_000_000_000u64),
            "layer `model.layers.0.self_attn.q_proj`: out_features x in_features",
        ),
        (
            "dup.json",
            |v| {
                let l = v["layers"][0].clone();
                v["layers"].as_array_mut().unwrap().push(l);
            },
            "layer `model.layers.0.self_attn.q_proj` appears twice",
        ),
        (
            "formats.json",
            |v| v["formats"] = serde_json::json!(["fp8", "fp8"]),
            "formats: fp8 is listed twice",
        ),
    ];
    for (name, edit, expected) in cases {
        let mut v = base.clone();
        edit(&mut v);
        let path = dir.path().join(name);
        std::fs::write(&path, v.to_string()).unwrap();
        let msg = fpx::calib::Calibration::read(&path)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains(name) && msg.contains(expected),
            "{name}: expected `{expected}` in: {msg}"
        );
    }
}

#[test]
fn a_plan_fpx_would_not_read_is_not_written() {
    let dir = tempfile::tempdir().unwrap();
    let seed =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("plans/smollm2-ilp-gamma0.5-h100.plan.json");
    let mut plan = fpx::plan::Plan::read(&seed).unwrap();
    plan.totals.as_mut().unwrap().total_latency = f64::INFINITY;
    let out = dir.path().join("out.plan.json");
    let msg = plan.write(&out).unwrap_err().to_string();
    assert!(
        msg.contains("out.plan.json") && msg.contains("totals.total_latency is inf"),
        "{msg}"
    );
    assert!(!out.exists());
    // A NaN deeper in the record (serde writes it as null) is caught by the read-back.
    let mut plan = fpx::plan::Plan::read(&seed).unwrap();
    if let Some(p) = plan.provenance.as_mut() {
        if let fpx::plan::SolverRecord::Ilp { lower_bound, .. } = &mut p.solver {
            *lower_bound = f64::NAN;
        }
    }
    let msg = plan.write(&out).unwrap_err().to_string();
    assert!(msg.contains("would not read it back"), "{msg}");
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
