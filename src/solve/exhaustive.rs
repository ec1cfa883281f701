//! Exhaustive search: every combination of one format per unit. The ground truth the ILP is
//! tested against on small instances, and the place where the budget checks shared by all
//! solvers live (`check_bounds`).

use crate::error::{Error, Result};

use super::units::{self, min_total, Unit};
use super::{fits, Constraints, Problem, Solution, Target};

/// Largest number of combinations [`exhaustive`] enumerates.
pub const MAX_COMBINATIONS: u64 = 1 << 22;

/// Rejects budgets below what any assignment achieves, saying which constraint binds and the
/// minimum achievable value. (Budgets that are each achievable but not together are found
/// by the solvers.)
pub(crate) fn check_bounds(units: &[Unit], c: &Constraints) -> Result<()> {
    let fail = |what: &str, budget: String, min: String, how: &str| {
        Err(Error::Infeasible {
            reason: format!(
                "the {what} budget {budget} is below the minimum achievable {min} ({how})"
            ),
        })
    };
    match c.target {
        Target::Latency { seconds } => {
            let min = min_total(units, |o| o.latency);
            if !(seconds.is_finite() && fits(min, seconds)) {
                return fail(
                    "latency",
                    format!("{:.6} ms", seconds * 1e3),
                    format!("{:.6} ms", min * 1e3),
                    "every layer in its fastest allowed format",
                );
            }
        }
        Target::Error { error } => {
            let min = min_total(units, |o| o.error);
            if !(error.is_finite() && fits(min, error)) {
                return fail(
                    "error",
                    format!("{error:.6}"),
                    format!("{min:.6}"),
                    "every layer in its most accurate allowed format",
                );
            }
        }
    }
    if let Some(mem) = c.memory {
        let min = min_total(units, |o| o.bytes as f64);
        if min > mem as f64 {
            return fail(
                "weight-memory",
                format!("{mem} bytes"),
                format!("{min} bytes"),
                "every layer in its smallest allowed format",
            );
        }
    }
    Ok(())
}

/// The optimum by enumeration: least total error under the latency budget (or least latency
/// under the error budget), ties broken by the other quantity, then by enumeration order.
/// Errors when there are more than [`MAX_COMBINATIONS`] combinations or none is feasible.
pub fn exhaustive(p: &Problem, c: &Constraints) -> Result<Solution> {
    p.validate()?;
    let units = units::units(p)?;
    check_bounds(&units, c)?;
    let combos = units
        .iter()
        .try_fold(1u64, |acc, u| acc.checked_mul(u.options.len() as u64))
        .filter(|&n| n <= MAX_COMBINATIONS)
        .ok_or_else(|| {
            Error::invalid(
                "exhaustive search",
                format!("more than {MAX_COMBINATIONS} combinations"),
            )
        })?;
    let mut picks = vec![0usize; units.len()];
    let mut best: Option<(f64, f64, Vec<usize>)> = None;
    for _ in 0..combos {
        let (mut err, mut lat, mut bytes) = (0.0, 0.0, 0u64);
        for (u, &k) in units.iter().zip(&picks) {
            let o = &u.options[k];
            err += o.error;
            lat += o.latency;
            bytes += o.bytes;
        }
        let memory_ok = c.memory.is_none_or(|m| bytes <= m);
        let (ok, key) = match c.target {
            Target::Latency { seconds } => (fits(lat, seconds), (err, lat)),
            Target::Error { error } => (fits(err, error), (lat, err)),
        };
        if ok && memory_ok && best.as_ref().is_none_or(|b| key < (b.0, b.1)) {
            best = Some((key.0, key.1, picks.clone()));
        }
        // Next combination (mixed radix, first unit fastest).
        for (u, k) in units.iter().zip(picks.iter_mut()) {
            *k += 1;
            if *k < u.options.len() {
                break;
            }
            *k = 0;
        }
    }
    let (_, _, picks) = best.ok_or_else(|| Error::Infeasible {
        reason: "no assignment meets all budgets together".into(),
    })?;
    Ok(units::expand(p, &units, &picks))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::solve::testing::two_format;

    #[test]
    fn finds_the_optimum_and_explains_infeasibility() {
        // Savings 1 each; errors of fp4 0.05, 0.02, 0.04 over fp8 0.01.
        let p = two_format(&[
            (0.01, 0.05, 2.0, 1.0),
            (0.01, 0.02, 2.0, 1.0),
            (0.01, 0.04, 2.0, 1.0),
        ]);
        let c = |seconds| Constraints {
            target: Target::Latency { seconds },
            memory: None,
        };
        let s = exhaustive(&p, &c(4.0)).unwrap();
        assert_eq!(s.choice, vec![0, 3, 5]);
        let s = exhaustive(&p, &c(5.0)).unwrap();
        assert_eq!(s.choice, vec![0, 3, 4]);
        let e = exhaustive(&p, &c(2.5)).unwrap_err().to_string();
        assert!(
            e.contains(
                "latency budget 2500.000000 ms is below the minimum achievable 3000.000000 ms"
            ),
            "{e}"
        );
        let mem = Constraints {
            target: Target::Latency { seconds: 6.0 },
            memory: Some(100),
        };
        let e = exhaustive(&p, &mem).unwrap_err().to_string();
        assert!(
            e.contains("weight-memory budget 100 bytes") && e.contains("180 bytes"),
            "{e}"
        );
        let both = Constraints {
            target: Target::Error { error: 0.05 },
            memory: Some(200),
        };
        let e = exhaustive(&p, &both).unwrap_err().to_string();
        assert!(
            e.contains("no assignment meets all budgets together"),
            "{e}"
        );
    }
}
