//! Bad checkpoints: every one must give a clear, typed error naming the file (and the tensor
//! where there is one), never a panic. Each test starts from a valid synthetic checkpoint and
//! breaks one thing.

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};

use common::{edit_gguf, set_meta};

use candle_core::quantized::gguf_file::Value;
use fpx::model::synthetic::{tiny_spec, write_gguf, write_hf_checkpoint, GgmlDType, HfDtype};
use fpx::model::{load_model, Architecture, ModelSpec};
use fpx::Error;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

fn hf_checkpoint(root: &Path, shards: usize) -> PathBuf {
    let dir = root.join("hf");
    write_hf_checkpoint(
        &dir,
        &tiny_spec(Architecture::Llama),
        1,
        HfDtype::F16,
        shards,
    )
    .unwrap();
    dir
}

fn gguf_file(root: &Path, spec: &ModelSpec, ty: GgmlDType) -> PathBuf {
    let path = root.join("model.gguf");
    write_gguf(&path, spec, 1, ty).unwrap();
    path
}

fn load_err(path: &Path) -> Error {
    match load_model(path) {
        Ok(m) => panic!("{} loaded but should not have: {m:?}", path.display()),
        Err(e) => e,
    }
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
}

/// Rewrite a single-file safetensors checkpoint through `edit` (name, dtype, shape, bytes).
fn edit_safetensors(path: &Path, edit: impl Fn(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>)) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut tensors);
    let views: Vec<_> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn truncate(path: &Path, len: u64) {
    File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

// ---- files and directories ----

#[test]
fn missing_file_is_an_io_error_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    for p in [dir.path().join("nope.gguf"), dir.path().join("no-such-dir")] {
        match load_err(&p) {
            Error::Io { path, source } => {
                assert_eq!(path, p);
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            }
            other => panic!("unexpected {other}"),
        }
    }
}

#[test]
fn a_file_that_is_neither_gguf_nor_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("notes.txt");
    std::fs::write(&p, "hello").unwrap();
    assert!(matches!(load_err(&p), Error::File { path, .. } if path == p));
}

#[test]
fn missing_config_json() {
    let root = tempfile::tempdir().unwrap();
    let dir = hf_checkpoint(root.path(), 1);
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let e = load_err(&dir);
    assert!(
        matches!(&e, Error::Io { path, .. } if *path == dir.join("config.json")),
        "{e}"
    );
    assert!(e.to_string().contains("config.json"));
}

#[test]
fn config_that_is_not_json() {
    let root = tempfile::tempdir().unwrap();
    let dir = hf_checkpoint(root.path(), 1);
    std::fs::write(dir.join("config.json"), "{\"hidden_size\": 64,").unwrap();
    assert!(
        matches!(load_err(&dir), Error::Config { path, .. } if path == dir.join("config.json"))
    );
}

#[test]
fn unknown_hf_architecture() {
    let root = tempfile::tempdir().unwrap();
    let dir = hf_checkpoint(root.path(), 1);
    edit_config(&dir, |c| {
        c["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"])
    });
    match load_err(&dir) {
        Error::UnsupportedArchitecture {
            path,
            arch,
            supported,
        } => {
            assert_eq!(path, dir.join("config.json"));
            assert_eq!(arch, "GPTNeoXForCausalLM");
            assert!(supported.contains("LlamaForCausalLM"));
        }
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn inconsistent_head_counts() {
    let root = tempfile::tempdir().unwrap();
    let dir = hf_checkpoint(root.path(), 1);
    edit_config(&dir, |c| c["num_key_value_heads"] = 3.into());
    match load_err(&dir) {
        Error::Config { reason, .. } => assert!(reason.contains("num_key_value_heads"), "{reason}"),
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn missing_tokenizer_json() {
    let root = tempfile::tempdir().unwrap();
    let dir = hf_checkpoint(root.path(), 1);
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    assert!(
        matches!(load_err(&dir), Error::Tokenizer { path, .. } if path == dir.join("tokenizer.json"))
    );
}

// ---- safetensors ----

#[test]
fn truncated_safetensors_names_the_file() {
    let root = tempfile::tempdir().unwrap();
    let dir = hf_checkpoint(root.path(), 1);
    let file = dir.join("model.safetensors");
    let len = std::fs::metadata(&file).unwrap().len();
    for cut in [len - 1, len / 2, 200, 9, 3, 0] {
        truncate(&file, cut);
        match load_err(&dir) {
            Error::Corrupt { path, .. } => assert_eq!(path, file, "cut at {cut}"),
            other => panic!("cut at {cut}: unexpected {other}"),
        }
    }
}

#[test]
fn garbage_safetensors_header() {
    let root = tempfile::tempdir().unwrap();
    let dir = hf_checkpoint(root.path(), 1);
    let file = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    // A plausible header length followed by bytes that are not JSON.
    for (i, b) in bytes.iter_mut().enumerate().skip(8).take(64) {
        *b = (i * 37 % 251) as u8;
    }
    std::fs::write(&file, &bytes).unwrap();
    let e = load_err(&dir);
    assert!(
        matches!(&e, Error::Corrupt { path, .. } if *path == file),
        "{e}"
    );
    // An absurd header length.
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&file, &bytes).unwrap();
    assert!(matches!(load_err(&dir), Error::Corrupt { path, .. } if path == file));
}

#[test]
fn unsupported_safetensors_dtype_names_the_tensor() {
    let root = tempfile::tempdir().unwrap();
    let dir = hf_checkpoint(root.path(), 1);
    let file = dir.join("model.safetensors");
    let target = "model.layers.0.mlp.up_proj.weight";
    edit_safetensors(&file, |ts| {
        let t = ts.iter_mut().find(|t| t.0 == target).unwrap();
        t.1 = Dtype::I32;
        t.3 = vec![0u8; t.2.iter().product::<usize>() * 4];
    });
    match load_err(&dir) {
        Error::UnsupportedDtype {
            path,
            tensor,
            dtype,
        } => {
            assert_eq!(
                (path, tensor.as_str(), dtype.as_str()),
                (file, target, "I32")
            );
        }
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn shape_mismatch_between_config_and_weights() {
    let root = tempfile::tempdir().unwrap();
    let dir = hf_checkpoint(root.path(), 1);
    edit_config(&dir, |c| c["intermediate_size"] = 96.into());
    match load_err(&dir) {
        Error::ShapeMismatch {
            path,
            tensor,
            expected,
            found,
        } => {
            assert_eq!(path, dir.join("model.safetensors"));
            assert_eq!(tensor, "model.layers.0.mlp.gate_proj.weight");
            assert_eq!((expected, found), (vec![96, 64], vec![128, 64]));
        }
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn missing_tensor_is_named() {
    let root = tempfile::tempdir().unwrap();
    let dir = hf_checkpoint(root.path(), 1);
    // Untied embeddings need lm_head.weight, which a tied checkpoint lacks.
    edit_config(&dir, |c| c["tie_word_embeddings"] = false.into());
    assert!(
        matches!(load_err(&dir), Error::MissingTensor { tensor, .. } if tensor == "lm_head.weight")
    );
    edit_config(&dir, |c| c["tie_word_embeddings"] = true.into());
    let gone = "model.layers.1.mlp.down_proj.weight";
    edit_safetensors(&dir.join("model.safetensors"), |ts| {
        ts.retain(|t| t.0 != gone)
    });
    match load_err(&dir) {
        Error::MissingTensor { path, tensor } => {
            assert_eq!((path, tensor.as_str()), (dir.clone(), gone));
        }
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn sharded_checkpoint_with_a_missing_shard() {
    let root = tempfile::tempdir().unwrap();
    let dir = hf_checkpoint(root.path(), 3);
    let shard = dir.join("model-00002-of-00003.safetensors");
    std::fs::remove_file(&shard).unwrap();
    assert!(matches!(load_err(&dir), Error::Io { path, .. } if path == shard));
}

// ---- GGUF ----

#[test]
fn truncated_gguf_names_the_file() {
    let root = tempfile::tempdir().unwrap();
    let file = gguf_file(
        root.path(),
        &tiny_spec(Architecture::Llama),
        GgmlDType::Q8_0,
    );
    let bytes = std::fs::read(&file).unwrap();
    let len = bytes.len();
    for cut in [len - 1, len - 40, len / 2, len / 5, 4000, 100, 30, 10, 4, 0] {
        std::fs::write(&file, &bytes[..cut]).unwrap();
        match load_err(&file) {
            Error::Corrupt { path, .. } => assert_eq!(path, file, "cut at {cut}"),
            other => panic!("cut at {cut}: unexpected {other}"),
        }
    }
}

#[test]
fn garbage_gguf() {
    let root = tempfile::tempdir().unwrap();
    let file = root.path().join("model.gguf");
    std::fs::write(&file, b"this is not a gguf file at all, just some text").unwrap();
    let e = load_err(&file);
    assert!(
        matches!(&e, Error::Corrupt { path, reason } if *path == file && reason.contains("not a GGUF")),
        "{e}"
    );
}

#[test]
fn unsupported_gguf_types_name_the_tensor() {
    let root = tempfile::tempdir().unwrap();
    // Q2_K: a real ggml type fpx does not read (256-wide rows for the K block).
    let wide = ModelSpec {
        hidden_size: 256,
        intermediate_size: 512,
        head_dim: 64,
        num_layers: 1,
        ..tiny_spec(Architecture::Llama)
    };
    let file = gguf_file(root.path(), &wide, GgmlDType::Q2K);
    match load_err(&file) {
        Error::UnsupportedDtype {
            path,
            tensor,
            dtype,
        } => {
            assert_eq!(
                (path, tensor.as_str(), dtype.as_str()),
                (file.clone(), "model.embed_tokens.weight", "Q2_K")
            );
        }
        other => panic!("unexpected {other}"),
    }

    // An IQ type (which candle cannot even parse): patch the type id of one tensor.
    let file = gguf_file(
        root.path(),
        &tiny_spec(Architecture::Llama),
        GgmlDType::Q8_0,
    );
    let mut bytes = std::fs::read(&file).unwrap();
    let name = b"blk.0.ffn_up.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    let n_dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let type_at = at + 4 + 8 * n_dims;
    bytes[type_at..type_at + 4].copy_from_slice(&16u32.to_le_bytes());
    std::fs::write(&file, &bytes).unwrap();
    match load_err(&file) {
        Error::UnsupportedDtype { tensor, dtype, .. } => {
            assert_eq!(
                (tensor.as_str(), dtype.as_str()),
                ("model.layers.0.mlp.up_proj.weight", "IQ2_XXS")
            );
        }
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn unsupported_gguf_architecture() {
    let root = tempfile::tempdir().unwrap();
    let file = gguf_file(root.path(), &tiny_spec(Architecture::Llama), GgmlDType::F16);
    edit_gguf(
        &file,
        |m| set_meta(m, "general.architecture", Value::String("gemma".into())),
        None,
    );
    match load_err(&file) {
        Error::UnsupportedArchitecture { path, arch, .. } => {
            assert_eq!((path, arch.as_str()), (file, "gemma"))
        }
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn gguf_rope_scaling_is_refused_by_name() {
    let root = tempfile::tempdir().unwrap();
    let file = gguf_file(root.path(), &tiny_spec(Architecture::Llama), GgmlDType::F32);
    edit_gguf(
        &file,
        |m| {
            m.push((
                "llama.rope.scaling.type".into(),
                Value::String("yarn".into()),
            ))
        },
        None,
    );
    match load_err(&file) {
        Error::Config { reason, .. } => {
            assert!(
                reason.contains("llama.rope.scaling.type") && reason.contains("yarn"),
                "{reason}"
            )
        }
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn gguf_missing_metadata_key() {
    let root = tempfile::tempdir().unwrap();
    let file = gguf_file(root.path(), &tiny_spec(Architecture::Qwen2), GgmlDType::F16);
    edit_gguf(&file, |m| m.retain(|(k, _)| k != "qwen2.block_count"), None);
    match load_err(&file) {
        Error::Config { reason, .. } => assert!(reason.contains("qwen2.block_count"), "{reason}"),
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn gguf_missing_tensor_and_shape_mismatch() {
    let root = tempfile::tempdir().unwrap();
    let file = gguf_file(
        root.path(),
        &tiny_spec(Architecture::Llama),
        GgmlDType::Q4_0,
    );
    edit_gguf(&file, |_| {}, Some("blk.1.ffn_down.weight"));
    match load_err(&file) {
        Error::MissingTensor { path, tensor } => {
            assert_eq!(
                (path, tensor.as_str()),
                (file.clone(), "model.layers.1.mlp.down_proj.weight")
            )
        }
        other => panic!("unexpected {other}"),
    }
    let file = gguf_file(
        root.path(),
        &tiny_spec(Architecture::Llama),
        GgmlDType::Q4_0,
    );
    edit_gguf(
        &file,
        |m| set_meta(m, "llama.feed_forward_length", Value::U32(96)),
        None,
    );
    assert!(matches!(
        load_err(&file),
        Error::ShapeMismatch { tensor, expected, found, .. }
            if tensor == "model.layers.0.mlp.gate_proj.weight" && expected == [96, 64] && found == [128, 64]
    ));
}

#[test]
fn gguf_sentencepiece_tokenizer_is_rejected() {
    let root = tempfile::tempdir().unwrap();
    let file = gguf_file(root.path(), &tiny_spec(Architecture::Llama), GgmlDType::F32);
    edit_gguf(
        &file,
        |m| set_meta(m, "tokenizer.ggml.model", Value::String("llama".into())),
        None,
    );
    match load_err(&file) {
        Error::Tokenizer { path, reason } => {
            assert_eq!(path, file);
            assert!(reason.contains("unsupported tokenizer model"), "{reason}");
        }
        other => panic!("unexpected {other}"),
    }
}
