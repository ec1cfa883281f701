//! The exported tensors, grouped into shards, and the streaming safetensors writer.
//!
//! A [`Unit`] is everything one source tensor becomes: a quantized linear's `weight` (FP8) or
//! `weight_packed` + scales (FP4), or one tensor in the export dtype. Every unit's byte sizes
//! follow from shapes alone, so the shard headers are written before any data is produced;
//! then each unit is quantized once, its parts written, and dropped. Peak memory is one
//! source tensor in FP32 plus its output bytes (`6 · max_elements` bytes for a 16-bit
//! tensor, `5.1 · max_elements` for a quantized one), not the model.
//!
//! Why not `safetensors::serialize_to_file`: it sorts tensors by dtype and asks each for its
//! bytes separately, so a layer's codes and scales (from one quantization) would have to be
//! held for the whole shard or quantized twice. The header is still the crate's
//! ([`Metadata`]), and every test reads the files back with the crate.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;

use crate::error::{Error, Result};

/// One tensor of a unit.
#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl Part {
    pub fn byte_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

/// The tensors one source tensor becomes, written together.
#[derive(Debug, Clone, PartialEq)]
pub struct Unit {
    pub parts: Vec<Part>,
}

impl Unit {
    fn byte_len(&self) -> usize {
        self.parts.iter().map(Part::byte_len).sum()
    }
}

/// Splits units, in order, into shards of at most `max_bytes` (a unit larger than that gets
/// a shard of its own).
pub fn plan_shards(units: &[Unit], max_bytes: u64) -> Vec<std::ops::Range<usize>> {
    let mut shards = Vec::new();
    let (mut start, mut size) = (0, 0u64);
    for (i, u) in units.iter().enumerate() {
        let n = u.byte_len() as u64;
        if i > start && size + n > max_bytes {
            shards.push(start..i);
            (start, size) = (i, 0);
        }
        size += n;
    }
    if start < units.len() {
        shards.push(start..units.len());
    }
    shards
}

/// The file name of shard `i` (0-based) of `n`, as Hugging Face names them.
pub fn shard_name(i: usize, n: usize) -> String {
    format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
}

/// Writes `units` into shards in `dir`, calling `produce(unit_index)` once per unit for the
/// bytes of its parts; returns the weight map (tensor -> shard file) and the total size.
pub fn write_shards(
    dir: &Path,
    units: &[Unit],
    max_bytes: u64,
    mut produce: impl FnMut(usize) -> Result<Vec<Vec<u8>>>,
) -> Result<(BTreeMap<String, String>, u64)> {
    let shards = plan_shards(units, max_bytes);
    let mut weight_map = BTreeMap::new();
    let mut total = 0u64;
    for (s, range) in shards.iter().enumerate() {
        let name = shard_name(s, shards.len());
        let path = dir.join(&name);
        let mut infos = Vec::new();
        let mut offset = 0;
        for part in units[range.clone()].iter().flat_map(|u| &u.parts) {
            let n = part.byte_len();
            let info = TensorInfo {
                dtype: part.dtype,
                shape: part.shape.clone(),
                data_offsets: (offset, offset + n),
            };
            infos.push((part.name.clone(), info));
            weight_map.insert(part.name.clone(), name.clone());
            offset += n;
        }
        let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        let header = Metadata::new(Some(meta), infos).map_err(|e| Error::File {
            path: path.clone(),
            what: "export",
            reason: format!("safetensors header: {e}"),
        })?;
        let mut header = serde_json::to_vec(&header).expect("header serializes");
        header.resize(header.len().next_multiple_of(8), b' ');
        let file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
        let io = |e| Error::io(&path, e);
        w.write_all(&(header.len() as u64).to_le_bytes())
            .map_err(io)?;
        w.write_all(&header).map_err(io)?;
        for u in range.clone() {
            let bytes = produce(u)?;
            check_lengths(&path, &units[u], &bytes)?;
            for b in &bytes {
                w.write_all(b).map_err(io)?;
            }
        }
        w.into_inner()
            .map_err(|e| Error::io(&path, e.into_error()))?
            .sync_all()
            .map_err(io)?;
        total += offset as u64;
    }
    Ok((weight_map, total))
}

fn check_lengths(path: &Path, unit: &Unit, bytes: &[Vec<u8>]) -> Result<()> {
    let ok = bytes.len() == unit.parts.len()
        && unit
            .parts
            .iter()
            .zip(bytes)
            .all(|(p, b)| p.byte_len() == b.len());
    if ok {
        return Ok(());
    }
    Err(Error::Tensor {
        path: PathBuf::from(path),
        tensor: unit
            .parts
            .first()
            .map_or_else(String::new, |p| p.name.clone()),
        reason: "produced bytes disagree with the planned shapes".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(name: &str, n: usize) -> Unit {
        Unit {
            parts: vec![Part {
                name: name.into(),
                dtype: Dtype::U8,
                shape: vec![n],
            }],
        }
    }

    #[test]
    fn shards_split_between_units_and_read_back() {
        let units = vec![unit("a", 6), unit("b", 6), unit("c", 20), unit("d", 1)];
        assert_eq!(plan_shards(&units, 12), vec![0..2, 2..3, 3..4]);
        assert_eq!(plan_shards(&units, 100), vec![0..4]);
        let dir = tempfile::tempdir().unwrap();
        let (map, total) = write_shards(dir.path(), &units, 12, |i| {
            Ok(vec![vec![i as u8; units[i].byte_len()]])
        })
        .unwrap();
        assert_eq!(total, 33);
        assert_eq!(map["c"], "model-00002-of-00003.safetensors");
        let bytes = std::fs::read(dir.path().join(&map["b"])).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("b").unwrap().data(), &[1u8; 6]);
        assert_eq!(st.tensor("a").unwrap().data(), &[0u8; 6]);
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
    }

    #[test]
    fn wrong_byte_counts_are_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = write_shards(dir.path(), &[unit("a", 4)], 100, |_| Ok(vec![vec![0; 3]]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`a`") && e.contains("disagree"), "{e}");
    }
}
