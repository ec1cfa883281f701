//! Every file fpx reads, parsed from bytes in memory: the entry points of the fuzz targets
//! (`fuzz/`) and of the test that replays their committed corpora (`tests/fuzz_corpus.rs`).
//!
//! Each function runs the same code the commands run on a file (header walk, validation
//! into domain types), minus the opening of the file; an `Err` is an ordinary refusal, and
//! anything else (a panic, an abort on memory, a hang) is a bug. The path only names the
//! bytes in messages.

use std::path::Path;

use crate::error::Result;

/// The kinds of input there is a fuzz target for; the names are the target names and the
/// corpus folders (`fuzz/corpus/NAME`).
pub const TARGETS: [&str; 9] = [
    "gguf_header",
    "gguf_tokenizer",
    "safetensors_header",
    "safetensors_index",
    "config_json",
    "calibration",
    "plan",
    "profile",
    "pins",
];

/// Parses `bytes` as the input kind `target` (one of [`TARGETS`]).
///
/// # Panics
/// On a name not in [`TARGETS`] (a programming error of the caller, not bad input).
pub fn parse(target: &str, bytes: &[u8]) -> Result<()> {
    match target {
        "gguf_header" => gguf(bytes),
        "gguf_tokenizer" => gguf_tokenizer(bytes),
        "safetensors_header" => safetensors_header(bytes),
        "safetensors_index" => safetensors_index(bytes),
        "config_json" => config_json(bytes),
        "calibration" => calibration(bytes),
        "plan" => plan(bytes),
        "profile" => profile(bytes),
        "pins" => pins(bytes),
        other => panic!("no parser named `{other}`"),
    }
}

/// A GGUF file: header, metadata, tensor table, spec, tensor checks and tokenizer, as
/// `load_model` does; then every tensor the model needs is read (dequantized, checked).
pub fn gguf(bytes: &[u8]) -> Result<()> {
    let path = Path::new("fuzz.gguf");
    let file = crate::model::gguf::GgufSource::from_bytes(path, Box::new(bytes.to_vec()))?;
    let model = crate::model::gguf_model(path, file)?;
    for name in model.weights.names() {
        model.weights.tensor(&name)?;
    }
    Ok(())
}

/// The tokenizer stored in a GGUF's metadata (only the header is parsed).
pub fn gguf_tokenizer(bytes: &[u8]) -> Result<()> {
    let path = Path::new("fuzz.gguf");
    let header =
        crate::model::gguf_header::parse(bytes).map_err(|reason| crate::Error::Corrupt {
            path: path.to_path_buf(),
            reason,
        })?;
    let tok = crate::model::Tokenizer::from_gguf_metadata(path, &header.metadata)?;
    tok.encode("Call me Ishmael. 1234")?;
    Ok(())
}

/// One safetensors file's header and tensor table.
pub fn safetensors_header(bytes: &[u8]) -> Result<()> {
    crate::model::safetensors::parse_shard(bytes, Path::new("fuzz.safetensors"), 0).map(|_| ())
}

/// `model.safetensors.index.json`.
pub fn safetensors_index(bytes: &[u8]) -> Result<()> {
    crate::model::safetensors::parse_index(bytes, Path::new("fuzz.index.json")).map(|_| ())
}

/// `config.json`, parsed and validated into a spec.
pub fn config_json(bytes: &[u8]) -> Result<()> {
    let path = Path::new("config.json");
    let raw = crate::model::config::HfConfig::parse(bytes, path)?;
    crate::model::ModelSpec::try_from(raw).map_err(|e| e.at(path))?;
    Ok(())
}

/// A calibration file.
pub fn calibration(bytes: &[u8]) -> Result<()> {
    crate::calib::Calibration::parse(bytes, Path::new("fuzz.calib.json")).map(|_| ())
}

/// A plan file.
pub fn plan(bytes: &[u8]) -> Result<()> {
    crate::plan::Plan::parse(bytes, Path::new("fuzz.plan.json")).map(|_| ())
}

/// A latency profile.
pub fn profile(bytes: &[u8]) -> Result<()> {
    crate::latency::profile::Profile::parse(bytes, Path::new("fuzz.profile.json")).map(|_| ())
}

/// A pins file (TOML).
pub fn pins(bytes: &[u8]) -> Result<()> {
    crate::solve::pins::Pins::parse(bytes, Path::new("fuzz.pins.toml")).map(|_| ())
}
