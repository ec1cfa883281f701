//! Next-token distributions of a reference model and the KL divergence of another model's from
//! them: the one implementation behind `fpx eval`, `fpx sweep` and calibration's KL pass.
//!
//! A [`NextTokenReference`] keeps, per predicting position, the reference probabilities `p`
//! (f32) and two f64 sums over them: `sum p log p` and `sum p`. Then
//! `KL(p || softmax(z)) = sum p log p - sum p z + logsumexp(z) sum p` needs one pass over a
//! candidate's logits `z` for the log-sum-exp and one dot product, and no log-softmax vector:
//! the KL pass evaluates hundreds of candidates against one reference. All sums are in f64.

use rayon::prelude::*;

use crate::runtime::cpu::Mat;

/// `log(sum(exp(z)))` of one row of logits, in f64 (max-shifted).
pub fn log_sum_exp(z: &[f32]) -> f64 {
    let max = z.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    z.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max
}

/// Negative log-likelihood of `next` under one row of logits.
pub fn nll(z: &[f32], next: u32) -> f64 {
    log_sum_exp(z) - z[next as usize] as f64
}

/// The reference's next-token distribution at every position of one window but the last.
pub struct NextTokenReference {
    vocab: usize,
    /// `[positions, vocab]` probabilities.
    probs: Vec<f32>,
    /// Per position, `sum p log p` with the stored `p`.
    neg_entropy: Vec<f64>,
    /// Per position, `sum p` of the stored `p` (1 up to rounding).
    mass: Vec<f64>,
    /// The reference's negative log-likelihood of the window's next tokens.
    nll: f64,
}

impl NextTokenReference {
    /// From the reference's logits of `window` (one row per token).
    pub fn new(logits: &Mat, window: &[u32]) -> NextTokenReference {
        let (vocab, positions) = (logits.cols, window.len() - 1);
        let mut probs = vec![0.0f32; positions * vocab];
        let sums: Vec<(f64, f64, f64)> = probs
            .par_chunks_mut(vocab)
            .enumerate()
            .map(|(i, p)| {
                let z = logits.row(i);
                let lse = log_sum_exp(z);
                let (mut neg_entropy, mut mass) = (0.0, 0.0);
                for (p, &v) in p.iter_mut().zip(z) {
                    let lp = v as f64 - lse;
                    *p = lp.exp() as f32;
                    neg_entropy += *p as f64 * lp;
                    mass += *p as f64;
                }
                (neg_entropy, mass, lse - z[window[i + 1] as usize] as f64)
            })
            .collect();
        NextTokenReference {
            vocab,
            probs,
            neg_entropy: sums.iter().map(|s| s.0).collect(),
            mass: sums.iter().map(|s| s.1).collect(),
            nll: sums.iter().map(|s| s.2).sum(),
        }
    }

    /// Number of predicting positions (the window's length minus one).
    pub fn predictions(&self) -> usize {
        self.mass.len()
    }

    /// The reference's summed negative log-likelihood of the window.
    pub fn nll(&self) -> f64 {
        self.nll
    }

    /// `KL(reference || softmax(logits))` summed over the predicting positions; `logits` has
    /// a row per token of the window (the last row is not read).
    pub fn kl_sum(&self, logits: &Mat) -> f64 {
        assert_eq!(logits.cols, self.vocab, "logits of another vocabulary");
        assert!(
            logits.rows > self.predictions(),
            "logits of a shorter window"
        );
        (0..self.predictions())
            .into_par_iter()
            .map(|i| {
                let z = logits.row(i);
                let p = &self.probs[i * self.vocab..(i + 1) * self.vocab];
                let pz: f64 = p.iter().zip(z).map(|(&p, &z)| p as f64 * z as f64).sum();
                self.neg_entropy[i] - pz + log_sum_exp(z) * self.mass[i]
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook form: `sum p (log p - log q)` with both log-softmaxes in f64.
    fn kl_direct(p: &[f32], q: &[f32]) -> f64 {
        let (lp, lq) = (log_sum_exp(p), log_sum_exp(q));
        p.iter()
            .zip(q)
            .map(|(&a, &b)| {
                let (a, b) = (a as f64 - lp, b as f64 - lq);
                a.exp() * (a - b)
            })
            .sum()
    }

    #[test]
    fn kl_equals_the_textbook_form_and_nll_the_log_softmax() {
        let vocab = 50;
        let reference = Mat::from_vec(
            3,
            vocab,
            (0..3 * vocab)
                .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.4)
                .collect(),
        );
        let other = Mat::from_vec(
            3,
            vocab,
            reference
                .data
                .iter()
                .enumerate()
                .map(|(i, v)| v + ((i * 7 % 5) as f32 - 2.0) * 0.05)
                .collect(),
        );
        let window = [1u32, 7, 49];
        let r = NextTokenReference::new(&reference, &window);
        assert_eq!(r.predictions(), 2);
        let expect: f64 = (0..2)
            .map(|i| kl_direct(reference.row(i), other.row(i)))
            .sum();
        let ours = r.kl_sum(&other);
        // p is stored in f32: the sums agree to its rounding.
        assert!(
            expect > 0.0 && (ours - expect).abs() <= 1e-6 * expect,
            "{ours} vs {expect}"
        );
        assert!(r.kl_sum(&reference).abs() < 1e-12);
        let nll: f64 = (0..2).map(|i| nll(reference.row(i), window[i + 1])).sum();
        assert!((r.nll() - nll).abs() < 1e-12);
    }
}
