//! Hugging Face safetensors weights: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json` (or, without an index, every `*.safetensors` in the folder).
//!
//! Each file is memory-mapped and only its JSON header is parsed up front; a tensor's bytes
//! are read and converted to FP32 when [`WeightSource::tensor`] asks for it. F32, F16 and BF16
//! are supported; any other dtype is an [`Error::UnsupportedDtype`] naming the tensor. A file
//! whose header does not parse or whose length disagrees with it is [`Error::Corrupt`].

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
#[cfg(unix)]
use memmap2::UncheckedAdvice;
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use super::{Tensor, TensorHeader, WeightSource};
use crate::error::{Error, Result};

/// Name of the single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Name of the shard index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Byte offset of the data section (8 + header length).
    data_start: usize,
}

pub(crate) struct Entry {
    shard: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// Lazily converted weights of a Hugging Face checkpoint.
pub struct SafetensorsSource {
    shards: Vec<Shard>,
    entries: BTreeMap<String, Entry>,
}

/// `model.safetensors.index.json` (only the field fpx reads).
#[derive(Deserialize)]
pub struct Index {
    weight_map: HashMap<String, String>,
}

impl Shard {
    /// Drops the mapped pages of bytes `start..end` from this process's resident set once a
    /// tensor has been converted, so a pass that streams the model stage by stage holds the
    /// pages of the tensor being converted, not every page of the checkpoint it has read
    /// (they stay in the kernel's page cache; a second read faults them back in). Only whole
    /// 64 KiB units inside the range are dropped (a multiple of every page size in use; the
    /// map starts on a page). Advice only: a failure changes nothing.
    fn release(&self, start: usize, end: usize) {
        const UNIT: usize = 64 << 10;
        let (from, to) = (start.next_multiple_of(UNIT), end / UNIT * UNIT);
        #[cfg(unix)]
        if to > from {
            // SAFETY: the map is shared and read-only, so MADV_DONTNEED discards nothing: the
            // next read of these pages sees the file's bytes, as before.
            let _ = unsafe {
                self.mmap
                    .unchecked_advise_range(UncheckedAdvice::DontNeed, from, to - from)
            };
        }
    }
}

fn corrupt(path: &Path, reason: impl Into<String>) -> Error {
    Error::Corrupt {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn map_file(path: &Path) -> Result<Mmap> {
    let file = crate::fsutil::open_regular(path)?;
    // SAFETY: the map is read-only; like every memory-mapped loader we assume the checkpoint
    // is not modified while fpx runs.
    unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

impl SafetensorsSource {
    /// Open the safetensors files of a checkpoint directory.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join(INDEX_FILE);
        let single = dir.join(SINGLE_FILE);
        let (files, index) = if index_path.is_file() {
            let bytes = crate::fsutil::read_regular(&index_path)?;
            let (files, index) = parse_index(&bytes, &index_path)?;
            (files, Some(index))
        } else if single.is_file() {
            (vec![SINGLE_FILE.to_string()], None)
        } else {
            let mut files = Vec::new();
            let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
            for entry in rd {
                let entry = entry.map_err(|e| Error::io(dir, e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.ends_with(".safetensors") {
                    files.push(name);
                }
            }
            files.sort();
            (files, None)
        };
        if files.is_empty() {
            return Err(Error::File {
                path: dir.to_path_buf(),
                what: "checkpoint",
                reason: format!("no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors files"),
            });
        }

        let mut shards = Vec::with_capacity(files.len());
        let mut entries = BTreeMap::new();
        let mut shard_of: HashMap<&str, usize> = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            let path = dir.join(f);
            let mmap = map_file(&path)?;
            let (n, shard_entries) = parse_shard(&mmap, &path, i)?;
            for (name, entry) in shard_entries {
                if entries.insert(name.clone(), entry).is_some() {
                    return Err(corrupt(
                        &path,
                        format!("tensor `{name}` appears in two shards"),
                    ));
                }
            }
            shard_of.insert(f.as_str(), i);
            shards.push(Shard {
                path,
                mmap,
                data_start: 8 + n,
            });
        }
        if let Some(index) = index {
            // Every tensor the index promises must be in the shard it names.
            let mut promised: Vec<_> = index.weight_map.iter().collect();
            promised.sort();
            for (name, file) in promised {
                let want = shard_of[file.as_str()];
                match entries.get(name) {
                    Some(e) if e.shard == want => {}
                    _ => {
                        return Err(Error::MissingTensor {
                            path: shards[want].path.clone(),
                            tensor: name.clone(),
                        })
                    }
                }
            }
        }
        Ok(SafetensorsSource { shards, entries })
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.shards[0]
                .path
                .parent()
                .unwrap_or(Path::new(""))
                .to_path_buf(),
            tensor: name.to_string(),
        })
    }

    /// A tensor's stored dtype, shape and bytes, and its file (for readers of encodings on
    /// top of safetensors, e.g. compressed-tensors' packed FP4).
    pub(crate) fn raw(&self, name: &str) -> Result<(Dtype, &[usize], &[u8], &Path)> {
        let e = self.entry(name)?;
        let shard = &self.shards[e.shard];
        let bytes = &shard.mmap[shard.data_start + e.start..shard.data_start + e.end];
        Ok((e.dtype, &e.shape, bytes, &shard.path))
    }

    /// Header of one tensor (file, stored dtype, shape), if present.
    pub(crate) fn header(&self, name: &str) -> Option<TensorHeader> {
        let e = self.entries.get(name)?;
        Some(TensorHeader {
            file: self.shards[e.shard].path.clone(),
            dtype: format!("{:?}", e.dtype),
            shape: e.shape.clone(),
            supported: matches!(e.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16),
        })
    }
}

/// Parses a shard index: the shard files it names (sorted, each once, plain file names).
pub fn parse_index(bytes: &[u8], path: &Path) -> Result<(Vec<String>, Index)> {
    let index: Index = serde_json::from_slice(bytes)
        .map_err(|e| corrupt(path, format!("invalid shard index: {e}")))?;
    let mut files: Vec<String> = index.weight_map.values().cloned().collect();
    files.sort();
    files.dedup();
    for f in &files {
        if f.is_empty() || f.contains('/') || f.contains('\\') || f.contains("..") {
            return Err(corrupt(
                path,
                format!("shard name `{f}` is not a plain file name"),
            ));
        }
    }
    Ok((files, index))
}

/// Parses the header of one safetensors file (`bytes`: the whole file) into its tensors,
/// returning the header length too. The `safetensors` crate checks that the offsets tile
/// the data section without gaps or overlaps and that each shape matches its byte size.
pub(crate) fn parse_shard(
    bytes: &[u8],
    path: &Path,
    shard: usize,
) -> Result<(usize, Vec<(String, Entry)>)> {
    let (n, meta) = SafeTensors::read_metadata(bytes)
        .map_err(|e| corrupt(path, format!("safetensors header: {e}")))?;
    let mut out = Vec::new();
    for (name, info) in meta.tensors() {
        crate::limits::tensor_elements(&info.shape)
            .map_err(|e| corrupt(path, format!("tensor `{name}`: {e}")))?;
        out.push((
            name.clone(),
            Entry {
                shard,
                dtype: info.dtype,
                shape: info.shape.clone(),
                start: info.data_offsets.0,
                end: info.data_offsets.1,
            },
        ));
    }
    Ok((n, out))
}

pub(crate) fn convert(bytes: &[u8], dtype: Dtype) -> Option<Vec<f32>> {
    let out = match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => return None,
    };
    Some(out)
}

impl WeightSource for SafetensorsSource {
    fn tensor(&self, name: &str) -> Result<Tensor> {
        let e = self.entry(name)?;
        let shard = &self.shards[e.shard];
        // read_metadata validated that the offsets lie inside the file.
        let (start, end) = (shard.data_start + e.start, shard.data_start + e.end);
        let data =
            convert(&shard.mmap[start..end], e.dtype).ok_or_else(|| Error::UnsupportedDtype {
                path: shard.path.clone(),
                tensor: name.to_string(),
                dtype: format!("{:?}", e.dtype),
            })?;
        shard.release(start, end);
        super::check_finite(&shard.path, name, &data)?;
        Ok(Tensor {
            shape: e.shape.clone(),
            data,
        })
    }

    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.entry(name)?.shape.clone())
    }

    fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    fn names(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }

    fn stored_dtype(&self, name: &str) -> Option<String> {
        Some(format!("{:?}", self.entries.get(name)?.dtype))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::synthetic::{random_weights, tiny_spec, write_hf_checkpoint, HfDtype};
    use crate::model::Architecture;

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    fn round_trip(dtype: HfDtype, shards: usize, tol: f32) {
        let dir = tempfile::tempdir().unwrap();
        let spec = tiny_spec(Architecture::Llama);
        write_hf_checkpoint(dir.path(), &spec, 7, dtype, shards).unwrap();
        let src = SafetensorsSource::open(dir.path()).unwrap();
        let originals = random_weights(&spec, 7);
        assert_eq!(src.names().len(), originals.len());
        for (name, t) in &originals {
            let got = src.tensor(name).unwrap();
            assert_eq!(got.shape, t.shape, "{name}");
            let err = max_abs_diff(&got.data, &t.data);
            assert!(err <= tol, "{name}: max error {err} > {tol} for {dtype:?}");
        }
    }

    #[test]
    fn hf_round_trip_f32() {
        round_trip(HfDtype::F32, 1, 0.0);
    }

    #[test]
    fn hf_round_trip_f16() {
        // |w| < ~1.5, f16 keeps 11 significant bits.
        round_trip(HfDtype::F16, 1, 1e-3);
    }

    #[test]
    fn hf_round_trip_bf16() {
        round_trip(HfDtype::BF16, 1, 8e-3);
    }

    #[test]
    fn hf_round_trip_sharded() {
        let dir = tempfile::tempdir().unwrap();
        let spec = tiny_spec(Architecture::Qwen2);
        write_hf_checkpoint(dir.path(), &spec, 3, HfDtype::F32, 3).unwrap();
        assert!(dir.path().join(INDEX_FILE).is_file());
        assert!(!dir.path().join(SINGLE_FILE).exists());
        let src = SafetensorsSource::open(dir.path()).unwrap();
        let files: std::collections::BTreeSet<_> = src
            .names()
            .iter()
            .map(|n| src.header(n).unwrap().file)
            .collect();
        assert_eq!(files.len(), 3);
        for (name, t) in random_weights(&spec, 3) {
            assert_eq!(src.tensor(&name).unwrap(), t, "{name}");
        }
    }

    #[test]
    fn missing_tensor_is_named() {
        let dir = tempfile::tempdir().unwrap();
        write_hf_checkpoint(
            dir.path(),
            &tiny_spec(Architecture::Llama),
            1,
            HfDtype::F16,
            1,
        )
        .unwrap();
        let src = SafetensorsSource::open(dir.path()).unwrap();
        match src.tensor("model.layers.9.mlp.up_proj.weight") {
            Err(Error::MissingTensor { tensor, .. }) => {
                assert_eq!(tensor, "model.layers.9.mlp.up_proj.weight")
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
