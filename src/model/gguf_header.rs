//! The GGUF container, read from a memory map: header, metadata key/values, tensor table,
//! and dequantization of one tensor's bytes to FP32.
//!
//! The header walk is done here rather than with `candle_core::quantized::gguf_file::Content`
//! because candle rejects the whole file at the first tensor type it does not know (IQ types,
//! ternary types) without saying which tensor it was; fpx wants to load the header of any
//! GGUF and report `UnsupportedDtype` naming the tensor, only when that tensor is needed.
//! Metadata values are candle's [`Value`] so that the synthetic writer (which uses candle's
//! `gguf_file::write`) and this reader speak the same types. Block layouts and the
//! dequantization kernels are candle's (`k_quants`). Every read is bounds-checked: a
//! truncated or garbage file is an error string, never a panic.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::k_quants::{self, GgmlType};
use candle_core::quantized::GgmlDType;

use crate::limits;

const MAX_DIMS: u32 = 4;
const MAX_DEPTH: usize = 8;
const DEFAULT_ALIGNMENT: usize = 32;
const MAX_ALIGNMENT: usize = 1 << 20;

/// One entry of the tensor table, as stored (dims in GGUF order: `ne[0]` = innermost).
#[derive(Debug, Clone)]
pub(crate) struct RawTensorInfo {
    pub name: String,
    pub dims: Vec<usize>,
    pub ggml_type: u32,
    /// Offset relative to the start of the data section.
    pub offset: usize,
}

/// A parsed GGUF header.
#[derive(Debug)]
pub(crate) struct GgufHeader {
    pub metadata: HashMap<String, Value>,
    pub tensors: Vec<RawTensorInfo>,
    /// Absolute byte offset of the data section.
    pub data_offset: usize,
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// GGUF v1 uses 32-bit lengths and counts, v2/v3 use 64-bit ones.
    wide: bool,
    /// Metadata elements (scalars and array items) read so far, against
    /// [`limits::MAX_METADATA_ELEMENTS`].
    elements: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        match end {
            Some(end) => {
                let s = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(format!(
                "file ends at byte {} while reading {what} at byte {}",
                self.bytes.len(),
                self.pos
            )),
        }
    }
    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let s = self.take(N, what)?;
        Ok(s.try_into().expect("take returned N bytes"))
    }
    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    fn len(&mut self, what: &str) -> Result<usize, String> {
        let n = if self.wide {
            self.u64(what)?
        } else {
            self.u32(what)? as u64
        };
        usize::try_from(n).map_err(|_| format!("{what} {n} is too large"))
    }
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }
    fn string(&mut self, what: &str) -> Result<String, String> {
        let n = self.len(what)?;
        if n > self.remaining() {
            return Err(format!(
                "{what}: string of {n} bytes runs past the end of the file"
            ));
        }
        let s = self.take(n, what)?;
        let s = s.strip_suffix(&[0]).unwrap_or(s);
        Ok(String::from_utf8_lossy(s).into_owned())
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<Value, String> {
        self.elements += 1;
        limits::at_most(
            self.elements,
            limits::MAX_METADATA_ELEMENTS,
            "the number of metadata elements",
        )?;
        let v = match ty {
            0 => Value::U8(self.array::<1>(key)?[0]),
            1 => Value::I8(self.array::<1>(key)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            7 => Value::Bool(self.array::<1>(key)?[0] != 0),
            8 => Value::String(self.string(key)?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(format!("metadata `{key}`: arrays nested too deeply"));
                }
                let elem_ty = self.u32(key)?;
                let n = self.len(key)?;
                // Every element takes at least one byte: reject impossible counts before
                // allocating, and counts whose in-memory values would be far larger than
                // the file.
                if n > self.remaining() {
                    return Err(format!(
                        "metadata `{key}`: array of {n} elements runs past the end of the file"
                    ));
                }
                limits::at_most(
                    n,
                    limits::MAX_METADATA_ARRAY,
                    &format!("metadata `{key}`: array length"),
                )?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem_ty, key, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            other => return Err(format!("metadata `{key}`: unknown value type {other}")),
        };
        Ok(v)
    }
}

/// Parse the header of a GGUF file held in memory.
pub(crate) fn parse(bytes: &[u8]) -> Result<GgufHeader, String> {
    let mut c = Cursor {
        bytes,
        pos: 0,
        wide: true,
        elements: 0,
    };
    let magic = c.array::<4>("magic")?;
    if &magic != b"GGUF" {
        return Err(format!("not a GGUF file (magic bytes {magic:02x?})"));
    }
    let version = c.u32("version")?;
    match version {
        1 => c.wide = false,
        2 | 3 => {}
        v => return Err(format!("unsupported GGUF version {v}")),
    }
    let n_tensors = c.len("tensor count")?;
    let n_kv = c.len("metadata count")?;
    // A key/value pair takes at least 13 bytes, a tensor entry at least 24.
    if n_kv
        .saturating_mul(13)
        .saturating_add(n_tensors.saturating_mul(24))
        > c.remaining()
    {
        return Err(format!(
            "header declares {n_tensors} tensors and {n_kv} metadata entries, more than the file holds"
        ));
    }
    let mut metadata = HashMap::with_capacity(n_kv);
    for _ in 0..n_kv {
        let key = c.string("metadata key")?;
        let ty = c.u32(&key)?;
        let value = c.value(ty, &key, 0)?;
        if metadata.contains_key(&key) {
            return Err(format!("metadata key `{key}` appears twice"));
        }
        metadata.insert(key, value);
    }
    let mut tensors = Vec::with_capacity(n_tensors);
    for _ in 0..n_tensors {
        let name = c.string("tensor name")?;
        let n_dims = c.u32(&name)?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(format!("tensor `{name}` has {n_dims} dimensions"));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(c.len(&name)?);
        }
        limits::tensor_elements(&dims)
            .map_err(|e| format!("tensor `{name}` has an impossible shape: {e}"))?;
        let ggml_type = c.u32(&name)?;
        let offset = c.u64(&name)?;
        let offset =
            usize::try_from(offset).map_err(|_| format!("tensor `{name}`: offset {offset}"))?;
        tensors.push(RawTensorInfo {
            name,
            dims,
            ggml_type,
            offset,
        });
    }
    // The GGUF spec requires a multiple of 8; a power of two keeps offsets computable.
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match as_usize(v) {
            Some(a) if a % 8 == 0 && a.is_power_of_two() && a <= MAX_ALIGNMENT => a,
            _ => {
                return Err(format!(
                    "general.alignment {v:?} is not a power of two between 8 and {MAX_ALIGNMENT}"
                ))
            }
        },
    };
    for t in &tensors {
        if t.offset % alignment != 0 {
            return Err(format!(
                "tensor `{}`: offset {} is not a multiple of the alignment {alignment}",
                t.name, t.offset
            ));
        }
    }
    let data_offset = c.pos.div_ceil(alignment) * alignment;
    Ok(GgufHeader {
        metadata,
        tensors,
        data_offset,
    })
}

/// The name ggml gives a tensor type id.
pub(crate) fn type_name(t: u32) -> String {
    let name = match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        other => return format!("ggml type {other}"),
    };
    name.to_string()
}

/// The tensor types fpx dequantizes.
pub(crate) fn supported_type(t: u32) -> Option<GgmlDType> {
    Some(match t {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        30 => GgmlDType::BF16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        _ => return None,
    })
}

/// Bytes a tensor of `n` elements takes, or why `n` does not fit the type's blocks.
pub(crate) fn byte_size(t: GgmlDType, n: usize) -> Result<usize, String> {
    let block = t.block_size();
    if !n.is_multiple_of(block) {
        return Err(format!(
            "{n} elements are not a whole number of {t:?} blocks ({block})"
        ));
    }
    limits::mul(n / block, t.type_size(), "byte size")
}

fn decode_blocks<T: GgmlType>(bytes: &[u8], n: usize) -> Vec<f32> {
    let size = std::mem::size_of::<T>();
    let n_blocks = bytes.len() / size;
    let mut blocks = vec![T::zeros(); n_blocks];
    // SAFETY: the block types are plain `repr(C)` structs of f16 and integer fields, valid for
    // any bit pattern; the copy fills exactly the `n_blocks * size` bytes the vector owns, and
    // copying (rather than casting the map) avoids any alignment assumption.
    unsafe {
        std::ptr::copy_nonoverlapping(
            bytes.as_ptr(),
            blocks.as_mut_ptr() as *mut u8,
            n_blocks * size,
        );
    }
    let mut out = vec![0f32; n];
    T::to_float(&blocks, &mut out);
    out
}

/// Dequantize `n` elements of type `t` stored in `bytes` (exactly `byte_size(t, n)` long).
pub(crate) fn dequantize(t: GgmlDType, bytes: &[u8], n: usize) -> Vec<f32> {
    match t {
        GgmlDType::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        GgmlDType::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        GgmlDType::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        GgmlDType::Q4_0 => decode_blocks::<k_quants::BlockQ4_0>(bytes, n),
        GgmlDType::Q4_1 => decode_blocks::<k_quants::BlockQ4_1>(bytes, n),
        GgmlDType::Q5_0 => decode_blocks::<k_quants::BlockQ5_0>(bytes, n),
        GgmlDType::Q5_1 => decode_blocks::<k_quants::BlockQ5_1>(bytes, n),
        GgmlDType::Q8_0 => decode_blocks::<k_quants::BlockQ8_0>(bytes, n),
        GgmlDType::Q8_1 => decode_blocks::<k_quants::BlockQ8_1>(bytes, n),
        GgmlDType::Q2K => decode_blocks::<k_quants::BlockQ2K>(bytes, n),
        GgmlDType::Q3K => decode_blocks::<k_quants::BlockQ3K>(bytes, n),
        GgmlDType::Q4K => decode_blocks::<k_quants::BlockQ4K>(bytes, n),
        GgmlDType::Q5K => decode_blocks::<k_quants::BlockQ5K>(bytes, n),
        GgmlDType::Q6K => decode_blocks::<k_quants::BlockQ6K>(bytes, n),
        GgmlDType::Q8K => decode_blocks::<k_quants::BlockQ8K>(bytes, n),
    }
}

/// Metadata accessors that accept any integer width (writers differ: u32, u64, i32).
pub(crate) fn as_usize(v: &Value) -> Option<usize> {
    match *v {
        Value::U8(x) => Some(x as usize),
        Value::U16(x) => Some(x as usize),
        Value::U32(x) => Some(x as usize),
        Value::U64(x) => usize::try_from(x).ok(),
        Value::I8(x) => usize::try_from(x).ok(),
        Value::I16(x) => usize::try_from(x).ok(),
        Value::I32(x) => usize::try_from(x).ok(),
        Value::I64(x) => usize::try_from(x).ok(),
        _ => None,
    }
}

/// A float metadata value (f32, f64, or an integer).
pub(crate) fn as_f64(v: &Value) -> Option<f64> {
    match *v {
        Value::F32(x) => Some(x as f64),
        Value::F64(x) => Some(x),
        _ => as_usize(v).map(|x| x as f64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_and_truncation_are_errors() {
        assert!(parse(b"").is_err());
        assert!(parse(b"GGU").is_err());
        assert!(parse(b"GGML\x03\0\0\0").unwrap_err().contains("not a GGUF"));
        assert!(parse(b"GGUF\x09\0\0\0").unwrap_err().contains("version"));
        // Claims a billion tensors in a 24-byte file.
        let mut b = b"GGUF\x03\0\0\0".to_vec();
        b.extend(1_000_000_000u64.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        assert!(parse(&b).unwrap_err().contains("more than the file holds"));
    }

    #[test]
    fn names_of_types() {
        assert_eq!(type_name(10), "Q2_K");
        assert_eq!(type_name(16), "IQ2_XXS");
        assert_eq!(type_name(999), "ggml type 999");
        assert!(supported_type(10).is_none());
        assert!(supported_type(16).is_none());
        assert_eq!(supported_type(14), Some(GgmlDType::Q6K));
    }
}
