//! Attention split over the KV length (flash-decoding) for passes of few rows. A decode step
//! has one query row per head, so a grid of (heads, rows) blocks leaves most of a GPU idle
//! and one block walks the whole context; instead the positions a row sees are cut into
//! `splits` equal chunks, one block per (head, row, chunk). Each block writes its chunk's
//! running maximum `m_s`, sum `l_s = sum exp(score - m_s)` and unnormalised output
//! `o_s = sum exp(score - m_s) v` to the sequence's partials buffer; the block that finishes
//! last for its (head, row) (a counter per pair, reset by that block) combines them:
//! `out = sum_s exp(m_s - M) o_s / sum_s exp(m_s - M) l_s` with `M = max_s m_s`.
//!
//! The split count is fixed per launch from the context capacity (so a captured CUDA graph
//! stays valid as the sequence grows) and each chunk's length from the current length, so
//! every block has work. Passes of more than [`SPLIT_ROWS`] rows (prefill) already fill the
//! GPU with (heads, rows) blocks and keep one block per row; so does a single split.

/// Passes of at most this many rows split the KV length (a decode batch).
pub const SPLIT_ROWS: usize = 8;
/// KV positions per split at the context capacity (a block's scores in shared memory).
pub const SPLIT_POSITIONS: usize = 256;
/// The most splits of one row (the partials buffer holds this many per row and head).
pub const MAX_SPLITS: usize = 32;

/// Splits of a pass of `rows` rows over a cache of `context` positions.
pub fn splits(rows: usize, context: usize) -> usize {
    if rows > SPLIT_ROWS {
        1
    } else {
        context.div_ceil(SPLIT_POSITIONS).clamp(1, MAX_SPLITS)
    }
}

/// Floats of one split's partial result: `m_s`, `l_s` and `o_s`.
pub fn partial_floats(head_dim: usize) -> usize {
    head_dim + 2
}

/// Bytes of the partials buffer of a sequence: [`SPLIT_ROWS`] x `heads` x [`MAX_SPLITS`]
/// partials (FP32), then one `u32` counter per (row, head).
pub fn partials_bytes(heads: usize, head_dim: usize) -> usize {
    4 * SPLIT_ROWS * heads * (MAX_SPLITS * partial_floats(head_dim) + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_passes_split_by_capacity_and_prefill_does_not() {
        assert_eq!(splits(1, 1), 1);
        assert_eq!(splits(1, SPLIT_POSITIONS), 1);
        assert_eq!(splits(1, SPLIT_POSITIONS + 1), 2);
        assert_eq!(splits(SPLIT_ROWS, 4096), 16);
        assert_eq!(splits(1, 1 << 20), MAX_SPLITS);
        assert_eq!(splits(SPLIT_ROWS + 1, 4096), 1);
    }
}
