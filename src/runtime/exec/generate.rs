//! Greedy generation on any backend of an executable plan, timed: the prefill pass over the
//! prompt gives the first token, then one decode step per further token. Also the reference
//! the backends are checked against: greedy tokens from the CPU reference forward
//! ([`CpuModel`], fake-quantized FP32 weights, the whole window recomputed per token).

use std::time::Instant;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::latency::Percentiles;
use crate::runtime::cpu::CpuModel;

/// A backend that runs an executable plan's steps.
pub trait Backend {
    fn name(&self) -> &'static str;
    /// Runs the steps over `tokens` at positions `pos..pos + tokens.len()` (appending their
    /// keys and values to the KV cache) and returns the greedy next token.
    fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<u32>;
    /// The logits of the last token of the last pass (`vocab` values).
    fn logits(&mut self) -> Result<Vec<f32>>;
}

/// The result of [`generate`].
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    /// New tokens (the prompt excluded).
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    /// Seconds of the prefill pass (which yields the first new token).
    pub prefill_seconds: f64,
    /// Seconds of each decode step (one per new token after the first).
    pub step_seconds: Vec<f64>,
}

impl Generation {
    /// Decode throughput: new tokens after the first per second of decode steps.
    pub fn decode_tokens_per_s(&self) -> Option<f64> {
        let total: f64 = self.step_seconds.iter().sum();
        (total > 0.0).then(|| self.step_seconds.len() as f64 / total)
    }
}

/// The distribution of a latency, in milliseconds (a [`Percentiles`] of the samples, scaled):
/// what latency-sensitive deployments are judged by is the tail (p95, p99, max), not only the
/// median.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatencyStats {
    pub count: usize,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl LatencyStats {
    /// The distribution of `seconds` (`None` when empty).
    pub fn of_seconds(seconds: &[f64]) -> Option<LatencyStats> {
        Percentiles::of(seconds).map(|p| LatencyStats {
            count: p.samples,
            mean_ms: p.mean * 1e3,
            p50_ms: p.p50 * 1e3,
            p95_ms: p.p95 * 1e3,
            p99_ms: p.p99 * 1e3,
            max_ms: p.max * 1e3,
        })
    }
}

/// Greedy decoding of up to `max_new` tokens after `prompt`, stopping after the first token
/// that is one of `eos` (the model's end-of-sequence ids; it is kept in the output).
pub fn generate(
    backend: &mut dyn Backend,
    prompt: &[u32],
    max_new: usize,
    eos: &[u32],
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(Error::invalid("prompt", "it encodes to no tokens"));
    }
    let mut out = Generation {
        tokens: Vec::new(),
        prompt_tokens: prompt.len(),
        prefill_seconds: 0.0,
        step_seconds: Vec::new(),
    };
    if max_new == 0 {
        return Ok(out);
    }
    let start = Instant::now();
    let mut next = backend.forward(prompt, 0)?;
    out.prefill_seconds = start.elapsed().as_secs_f64();
    out.tokens.push(next);
    while out.tokens.len() < max_new && !eos.contains(&next) {
        let pos = prompt.len() + out.tokens.len() - 1;
        let start = Instant::now();
        next = backend.forward(&[next], pos)?;
        out.step_seconds.push(start.elapsed().as_secs_f64());
        out.tokens.push(next);
    }
    Ok(out)
}

/// Greedy tokens of the CPU reference forward: the logits of the last position of the whole
/// window, recomputed for every new token.
pub fn greedy_reference(model: &CpuModel, prompt: &[u32], max_new: usize) -> Result<Vec<u32>> {
    let mut window = prompt.to_vec();
    let mut out = Vec::with_capacity(max_new);
    for _ in 0..max_new {
        let logits = model.forward(&window)?;
        let next = crate::runtime::cpu::kernels::argmax(logits.row(logits.rows - 1));
        out.push(next);
        window.push(next);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend whose greedy next token is the position it was asked for.
    struct Counter;

    impl Backend for Counter {
        fn name(&self) -> &'static str {
            "counter"
        }
        fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<u32> {
            Ok((pos + tokens.len()) as u32)
        }
        fn logits(&mut self) -> Result<Vec<f32>> {
            Ok(Vec::new())
        }
    }

    #[test]
    fn generation_stops_at_any_eos_id() {
        let prompt = [7, 7];
        let all = generate(&mut Counter, &prompt, 6, &[]).unwrap().tokens;
        assert_eq!(all, [2, 3, 4, 5, 6, 7]);
        // The second of two ids ends it too, and is kept.
        let stopped = generate(&mut Counter, &prompt, 6, &[9, 4]).unwrap().tokens;
        assert_eq!(stopped, [2, 3, 4]);
        let first = generate(&mut Counter, &prompt, 6, &[2]).unwrap();
        assert_eq!((first.tokens, first.step_seconds.len()), (vec![2], 0));
    }

    #[test]
    fn latency_stats_are_the_percentiles_in_milliseconds() {
        let samples: Vec<f64> = (1..=100).map(|i| i as f64 * 1e-3).collect();
        let s = LatencyStats::of_seconds(&samples).unwrap();
        assert_eq!(
            (s.count, s.p50_ms, s.p95_ms, s.max_ms),
            (100, 50.0, 95.0, 100.0)
        );
        assert!((s.mean_ms - 50.5).abs() < 1e-9);
        assert!(LatencyStats::of_seconds(&[]).is_none());
    }
}
