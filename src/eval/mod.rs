//! Quality metrics on real text: perplexity of a model over token windows and the KL
//! divergence of a quantized model's next-token distribution from the full-precision one.
//!
//! Windows are non-overlapping, `seq_len` tokens each, starting at token 0, with no BOS
//! added; inside a window, token `i+1` is predicted from tokens `0..=i`, so a window yields
//! `seq_len - 1` predictions.

pub mod kl;
mod text;

use rayon::prelude::*;
use serde::Serialize;

pub use text::load_text;

use crate::error::{Error, Result};
use crate::runtime::cpu::{CpuModel, Mat};

/// Splits `tokens` into at most `max_windows` whole windows of `seq_len` tokens.
pub fn windows(tokens: &[u32], seq_len: usize, max_windows: Option<usize>) -> Result<Vec<&[u32]>> {
    if seq_len < 2 {
        return Err(Error::invalid(
            "--seq-len",
            format!("{seq_len}: a window needs at least 2 tokens"),
        ));
    }
    if tokens.len() < seq_len {
        return Err(Error::invalid(
            "text",
            format!(
                "it has {} tokens, fewer than one window of {seq_len}",
                tokens.len()
            ),
        ));
    }
    let n = tokens.len() / seq_len;
    let n = max_windows.map_or(n, |m| m.min(n));
    if n == 0 {
        return Err(Error::invalid(
            "--windows",
            "0: at least one window is needed",
        ));
    }
    Ok(tokens.chunks_exact(seq_len).take(n).collect())
}

/// Sum of negative log-likelihoods of `window[i+1]` given logits row `i`.
pub fn nll_sum(logits: &Mat, window: &[u32]) -> f64 {
    (0..window.len() - 1)
        .into_par_iter()
        .map(|i| kl::nll(logits.row(i), window[i + 1]))
        .sum()
}

/// What `fpx eval` reports.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// Perplexity of the evaluated model (the plan's when a plan is given).
    pub perplexity: f64,
    /// Number of predicted tokens.
    pub tokens: usize,
    pub windows: usize,
    pub seq_len: usize,
    pub nll_sum: f64,
    /// Perplexity of the full-precision model (only with a plan).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference_perplexity: Option<f64>,
    /// Mean KL divergence of the plan's next-token distribution from the full-precision one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl: Option<f64>,
}

/// Perplexity of `model` over `windows`; with `reference`, also the reference perplexity and
/// the mean KL divergence from it. `progress` is called once per finished window.
pub fn evaluate(
    model: &CpuModel,
    reference: Option<&CpuModel>,
    windows: &[&[u32]],
    progress: &mut dyn FnMut(),
) -> Result<EvalReport> {
    let (mut nll, mut ref_nll, mut kl, mut count) = (0.0, 0.0, 0.0, 0);
    for window in windows {
        let logits = model.forward(window)?;
        nll += nll_sum(&logits, window);
        if let Some(r) = reference {
            let next = kl::NextTokenReference::new(&r.forward(window)?, window);
            ref_nll += next.nll();
            kl += next.kl_sum(&logits);
        }
        count += window.len() - 1;
        progress();
    }
    let n = count as f64;
    Ok(EvalReport {
        perplexity: (nll / n).exp(),
        tokens: count,
        windows: windows.len(),
        seq_len: windows.first().map_or(0, |w| w.len()),
        nll_sum: nll,
        reference_perplexity: reference.map(|_| (ref_nll / n).exp()),
        kl: reference.map(|_| kl / n),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_whole_and_capped() {
        let t: Vec<u32> = (0..10).collect();
        assert_eq!(windows(&t, 4, None).unwrap(), vec![&t[0..4], &t[4..8]]);
        assert_eq!(windows(&t, 4, Some(1)).unwrap().len(), 1);
        assert!(windows(&t, 11, None)
            .unwrap_err()
            .to_string()
            .contains("fewer than one window"));
        assert!(windows(&t, 4, Some(0)).is_err());
    }
}
