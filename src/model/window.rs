//! Sliding-window attention as a checkpoint defines it: query position `q` attends key
//! positions `k` with `q - size < k <= q` (transformers' `sliding_window_overlay`: the window
//! holds `size` positions, the query's own included), on the decoder layers listed. Mistral
//! slides every layer; Qwen2 and Qwen3 the layers `layer_types` (or `max_window_layers`)
//! select. A window of at least `max_position_embeddings` positions never drops a key, so
//! the config readers leave it out of the spec and specs without a window stay as they were.

use serde::{Deserialize, Serialize};

/// The window and the layers that use it (the others attend the whole context).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlidingWindow {
    /// Positions a query sees, its own included (`sliding_window` in config.json).
    pub size: usize,
    /// Decoder layers with windowed attention, ascending, at least one.
    pub layers: Vec<usize>,
}

impl SlidingWindow {
    /// The window of `layer`, if it has one.
    pub fn of_layer(&self, layer: usize) -> Option<usize> {
        self.layers
            .binary_search(&layer)
            .is_ok()
            .then_some(self.size)
    }

    /// Rules a window obeys in a model of `num_layers` layers.
    pub fn validate(&self, num_layers: usize) -> Result<(), String> {
        if self.size == 0 {
            return Err("sliding_window must be > 0".into());
        }
        if self.layers.is_empty() {
            return Err("a sliding window needs at least one layer".into());
        }
        if !self.layers.windows(2).all(|w| w[0] < w[1]) {
            return Err("sliding-window layers must be ascending without repeats".into());
        }
        match self.layers.last() {
            Some(&l) if l >= num_layers => Err(format!(
                "sliding-window layer {l} does not exist ({num_layers} layers)"
            )),
            _ => Ok(()),
        }
    }
}

/// The first key position a query at `pos` attends: `pos + 1 - window`, or 0 (the one rule
/// every backend's attention applies; `None`: the whole context).
pub fn first_key(pos: usize, window: Option<usize>) -> usize {
    match window {
        Some(w) => (pos + 1).saturating_sub(w),
        None => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_holds_size_positions_and_names_its_layers() {
        assert_eq!(first_key(0, Some(4)), 0);
        assert_eq!(first_key(3, Some(4)), 0);
        assert_eq!(first_key(4, Some(4)), 1);
        assert_eq!(first_key(9, None), 0);
        let w = SlidingWindow {
            size: 4,
            layers: vec![1, 3],
        };
        assert_eq!((w.of_layer(1), w.of_layer(2)), (Some(4), None));
        assert!(w.validate(4).is_ok());
        assert!(w.validate(3).unwrap_err().contains("layer 3"));
        let bad = SlidingWindow {
            size: 4,
            layers: vec![2, 1],
        };
        assert!(bad.validate(4).is_err());
    }
}
