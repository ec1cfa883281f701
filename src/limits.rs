//! Limits on what a file or a command line may make fpx allocate, in one place.
//!
//! Every count read from a file (array lengths, tensor dims, layer counts) and every size
//! computed from one goes through these helpers before anything is allocated from it: sizes
//! are products checked for overflow, and counts are held against a bound that is either the
//! size of the file they came from (each element takes at least one byte of it) or a sane
//! ceiling stated here. Errors are plain strings; callers add the file and the field.

/// Most elements one GGUF metadata array may hold. Each element costs about 32 bytes in
/// memory (candle's `Value`), so this bounds one array at 128 MiB; the largest real
/// vocabularies (about 260k tokens, a few hundred thousand merges) are far below it.
pub const MAX_METADATA_ARRAY: usize = 1 << 22;

/// Most metadata elements (scalars and array items, all keys together) one GGUF may hold.
pub const MAX_METADATA_ELEMENTS: usize = 1 << 23;

/// Most decoder layers a model may declare (the largest public models have ~130).
pub const MAX_LAYERS: usize = 4096;

/// Most elements of one tensor (2^40, 4 TiB in FP32): beyond any real checkpoint, and far
/// enough below `usize::MAX` that byte sizes computed from it cannot overflow.
pub const MAX_TENSOR_ELEMENTS: usize = 1 << 40;

/// The product of `dims`, or `None` on overflow.
pub fn checked_product(dims: &[usize]) -> Option<usize> {
    dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// The element count of a tensor of shape `dims`, refused above [`MAX_TENSOR_ELEMENTS`].
pub fn tensor_elements(dims: &[usize]) -> Result<usize, String> {
    match checked_product(dims) {
        Some(n) if n <= MAX_TENSOR_ELEMENTS => Ok(n),
        _ => Err(format!(
            "shape {dims:?} has more than {MAX_TENSOR_ELEMENTS} elements"
        )),
    }
}

/// `a * b` for a size named `what`, or an error saying it overflows.
pub fn mul(a: usize, b: usize, what: &str) -> Result<usize, String> {
    a.checked_mul(b)
        .ok_or_else(|| format!("{what} ({a} x {b}) overflows"))
}

/// Refuses a `count` of `what` above `max`, before anything is allocated for it.
pub fn at_most(count: usize, max: usize, what: &str) -> Result<usize, String> {
    if count > max {
        return Err(format!("{what} is {count}, more than the limit of {max}"));
    }
    Ok(count)
}

/// The number of worker threads to use for a `--threads` request: 0 means every core;
/// more than the machine's cores is refused, since extra threads only add overhead.
pub fn threads(requested: usize) -> Result<usize, String> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    match requested {
        0 => Ok(cores),
        n if n <= cores => Ok(n),
        n => Err(format!(
            "--threads {n} is more than this machine's {cores} cores"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_and_bounds_refuse_overflow() {
        assert_eq!(checked_product(&[3, 4, 5]), Some(60));
        assert_eq!(checked_product(&[1 << 62, 4]), None);
        assert!(tensor_elements(&[1 << 62]).is_err());
        assert_eq!(tensor_elements(&[2, 3]), Ok(6));
        assert!(mul(usize::MAX, 2, "bytes")
            .unwrap_err()
            .contains("overflows"));
        assert!(at_most(5, 4, "layers").unwrap_err().contains("limit of 4"));
        assert!(threads(100_000).unwrap_err().contains("cores"));
        assert!(threads(0).unwrap() >= 1);
    }
}
