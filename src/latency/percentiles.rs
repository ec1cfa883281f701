//! Latency distributions of measured samples: nearest-rank percentiles (the smallest sample
//! with at least p% of the samples at or below it), in seconds. What latency-sensitive
//! deployments are judged by is the tail (p95, p99, max), not only the median, so measured
//! profiles record it and the planner may budget on it ([`Percentile`]).

use serde::{Deserialize, Serialize};

/// Which statistic of a distribution a budget or report uses.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Percentile {
    /// The median.
    #[default]
    P50,
    P95,
    P99,
    /// The slowest sample.
    Max,
}

impl Percentile {
    pub fn name(self) -> &'static str {
        match self {
            Percentile::P50 => "p50",
            Percentile::P95 => "p95",
            Percentile::P99 => "p99",
            Percentile::Max => "max",
        }
    }

    /// Whether this is the median (the default every source can give).
    pub fn is_median(&self) -> bool {
        *self == Percentile::P50
    }
}

impl std::fmt::Display for Percentile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The distribution of a set of latency samples, seconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Percentiles {
    /// Samples the distribution is of.
    pub samples: usize,
    pub mean: f64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    /// The distribution of `seconds` (`None` when empty).
    pub fn of(seconds: &[f64]) -> Option<Percentiles> {
        let mut s = seconds.to_vec();
        s.sort_by(f64::total_cmp);
        let n = s.len();
        let rank = |p: f64| s[((p * n as f64).ceil() as usize).clamp(1, n) - 1];
        (n > 0).then(|| Percentiles {
            samples: n,
            mean: s.iter().sum::<f64>() / n as f64,
            p50: rank(0.50),
            p95: rank(0.95),
            p99: rank(0.99),
            max: s[n - 1],
        })
    }

    /// The statistic `p`.
    pub fn get(&self, p: Percentile) -> f64 {
        match p {
            Percentile::P50 => self.p50,
            Percentile::P95 => self.p95,
            Percentile::P99 => self.p99,
            Percentile::Max => self.max,
        }
    }

    /// Why this cannot be a distribution of latencies (for a file's validation).
    pub fn invalid(&self) -> Option<String> {
        let values = [self.mean, self.p50, self.p95, self.p99, self.max];
        if self.samples == 0 {
            return Some("0 samples".into());
        }
        if let Some(v) = values.iter().find(|v| !(v.is_finite() && **v >= 0.0)) {
            return Some(format!("{v} s is not a number of seconds >= 0"));
        }
        let ordered = self.p50 <= self.p95 && self.p95 <= self.p99 && self.p99 <= self.max;
        (!ordered).then(|| {
            format!(
                "percentiles out of order (p50 {} <= p95 {} <= p99 {} <= max {} must hold)",
                self.p50, self.p95, self.p99, self.max
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_follow_the_nearest_rank_rule() {
        let samples: Vec<f64> = (1..=100).rev().map(|i| i as f64).collect();
        let p = Percentiles::of(&samples).unwrap();
        assert_eq!(
            (p.samples, p.p50, p.p95, p.p99, p.max),
            (100, 50.0, 95.0, 99.0, 100.0)
        );
        assert!((p.mean - 50.5).abs() < 1e-12);
        assert_eq!(p.get(Percentile::P95), 95.0);
        assert!(p.invalid().is_none());
        let one = Percentiles::of(&[2.0]).unwrap();
        assert_eq!((one.p50, one.p99, one.max), (2.0, 2.0, 2.0));
        assert!(Percentiles::of(&[]).is_none());
        let bad = Percentiles { p95: 200.0, ..p };
        assert!(bad.invalid().unwrap().contains("out of order"), "{bad:?}");
    }
}
