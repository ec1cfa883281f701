//! Solver properties on random and constructed instances:
//! - the ILP matches exhaustive search exactly (objective within the MIP gap, same
//!   feasibility verdict) on small random instances with menus, groups and memory budgets;
//! - greedy-gamma never beats the ILP at the same latency;
//! - with uniform latencies the ILP's choice is the one theory predicts (see
//!   `uniform_latency_theorem`), and greedy coincides with it exactly when the theorem says.

use fpx::formats::Format;
use fpx::solve::exhaustive::exhaustive;
use fpx::solve::{
    greedy, ilp, Constraints, GreedyOptions, GreedyRule, IlpOptions, Problem, Target,
};
use fpx::Error;
use proptest::prelude::*;

/// A problem from per-layer (format, error, latency, bytes) menus and group ids.
fn problem(menus: &[Vec<(Format, f64, f64, u64)>], groups: &[u32]) -> Problem {
    let mut p = Problem {
        offsets: vec![0],
        ..Problem::default()
    };
    for (i, menu) in menus.iter().enumerate() {
        p.names.push(format!("model.layers.{i}.mlp.down_proj"));
        p.groups.push(groups[i]);
        for &(f, e, l, b) in menu {
            p.precisions
                .push(fpx::lower::LinearPrecision::weight_only(f));
            p.error.push(e);
            p.eps.push(e);
            p.latency.push(l);
            p.bytes.push(b);
        }
        p.offsets.push(p.precisions.len());
    }
    p
}

/// Objective value of a solution under a target.
fn objective(p: &Problem, choice: &[usize], t: Target) -> f64 {
    let tot = p.totals(choice);
    match t {
        Target::Latency { .. } => tot.error,
        Target::Error { .. } => tot.latency,
    }
}

/// The default relative MIP gap: the ILP may stop this far from the optimum.
const GAP: f64 = 1e-4;
/// Proven optimal: HiGHS closes the gap completely.
const EXACT: IlpOptions = IlpOptions {
    mip_rel_gap: 0.0,
    time_limit: None,
};

/// A random instance: 1..=7 layers, menus of 1..=4 formats, optional groups, a target
/// between the extremes and maybe a memory budget.
fn instance() -> impl Strategy<Value = (Problem, Constraints)> {
    let layer = prop::collection::vec((0.0..1.0f64, 1.0..10.0f64, 10u64..100), 1..=4);
    (
        prop::collection::vec(layer, 1..=7),
        prop::collection::vec(0u32..4, 7),
        any::<bool>(),
        0.0..1.0f64,
        prop::option::of(0.0..1.0f64),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(layers, group_ids, grouped, frac, mem_frac, error_target, shapes)| {
                // With `shapes`, layers alternate between two shapes: the menu, latencies
                // and bytes of layer 0 or 1, with their own errors (the classes of the
                // aggregated formulation).
                let menus: Vec<Vec<(Format, f64, f64, u64)>> = (0..layers.len())
                    .map(|i| {
                        let shape = if shapes {
                            &layers[i % 2.min(layers.len())]
                        } else {
                            &layers[i]
                        };
                        (0..shape.len())
                            .map(|k| {
                                let (_, t, b) = shape[k];
                                let e = layers[i][k % layers[i].len()].0;
                                (Format::ALL[k], e * 1e-2, t * 1e-6, b)
                            })
                            .collect()
                    })
                    .collect();
                let n = menus.len();
                let groups: Vec<u32> = (0..n)
                    .map(|i| if grouped { group_ids[i] } else { 10 + i as u32 })
                    .collect();
                let p = problem(&menus, &groups);
                // Extremes over layers (ignoring groups, so some budgets are infeasible).
                let ext = |f: fn(&Problem, usize) -> f64, max: bool| -> f64 {
                    (0..n)
                        .map(|i| {
                            p.choices(i).map(|c| f(&p, c)).fold(
                                if max { f64::MIN } else { f64::MAX },
                                |a, v| if max { a.max(v) } else { a.min(v) },
                            )
                        })
                        .sum()
                };
                let lat = |p: &Problem, c: usize| p.latency[c];
                let err = |p: &Problem, c: usize| p.error[c];
                let bytes = |p: &Problem, c: usize| p.bytes[c] as f64;
                let target = if error_target {
                    let (lo, hi) = (ext(err, false), ext(err, true));
                    Target::Error {
                        error: lo + frac * (hi - lo),
                    }
                } else {
                    let (lo, hi) = (ext(lat, false), ext(lat, true));
                    Target::Latency {
                        seconds: lo + frac * (hi - lo),
                    }
                };
                let memory = mem_frac.map(|m| {
                    let (lo, hi) = (ext(bytes, false), ext(bytes, true));
                    (lo + m * (hi - lo)) as u64
                });
                (p, Constraints { target, memory })
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn ilp_matches_exhaustive_search((p, c) in instance()) {
        let exact = exhaustive(&p, &c);
        let solved = ilp(&p, &c, &EXACT);
        match (exact, solved) {
            (Ok(e), Ok(s)) => {
                let (oe, os) = (objective(&p, &e.choice, c.target), objective(&p, &s.solution.choice, c.target));
                // The ILP's assignment is feasible, so it cannot beat the true optimum; with
                // gap 0 it equals it (up to floating-point summation).
                prop_assert!((os - oe).abs() <= 1e-9 * oe.abs().max(1e-9), "ilp {os} vs exhaustive {oe}");
                // The LP bound is a valid bound.
                prop_assert!(s.lower_bound <= oe * (1.0 + 1e-9) + 1e-12, "bound {} > optimum {oe}", s.lower_bound);
                let t = s.solution.totals;
                match c.target {
                    Target::Latency { seconds } => prop_assert!(fpx::solve::fits(t.latency, seconds)),
                    Target::Error { error } => prop_assert!(fpx::solve::fits(t.error, error)),
                }
                if let Some(m) = c.memory {
                    prop_assert!(t.bytes <= m);
                }
                // Group members share a format.
                for i in 0..p.len() {
                    for j in 0..p.len() {
                        if p.groups[i] == p.groups[j] {
                            prop_assert_eq!(p.precisions[s.solution.choice[i]], p.precisions[s.solution.choice[j]]);
                        }
                    }
                }
            }
            (Err(Error::Infeasible { .. }), Err(Error::Infeasible { .. })) => {}
            (e, s) => prop_assert!(false, "exhaustive {e:?} but ilp {s:?}"),
        }
    }

    #[test]
    fn greedy_never_beats_the_ilp_at_equal_latency(
        layers in prop::collection::vec((0.0..0.05f64, 0.02..0.3f64, 1.0..9.0f64, 0.2..0.9f64), 2..40),
        gamma in 0.0..=1.0f64,
    ) {
        let menus: Vec<Vec<(Format, f64, f64, u64)>> = layers
            .iter()
            .map(|&(e8, e4, t8, shrink)| vec![
                (Format::Fp8, e8, t8 * 1e-6, 100),
                (Format::Nvfp4, e8 + e4, t8 * shrink * 1e-6, 60),
            ])
            .collect();
        let groups: Vec<u32> = (0..menus.len() as u32).collect();
        let p = problem(&menus, &groups);
        let g = greedy(&p, &GreedyOptions::default(), GreedyRule::Gamma(gamma), None).unwrap();
        let budget = Target::Latency { seconds: g.solution.totals.latency };
        let s = ilp(&p, &Constraints { target: budget, memory: None }, &IlpOptions::default()).unwrap();
        prop_assert!(s.solution.totals.latency <= g.solution.totals.latency * (1.0 + 1e-9));
        prop_assert!(
            s.solution.totals.error <= g.solution.totals.error * (1.0 + GAP) + 1e-12,
            "greedy {} beats ilp {}", g.solution.totals.error, s.solution.totals.error
        );
    }
}

/// Theorem (uniform latencies). Let every layer `i` of `n` allow exactly two formats, hi
/// and lo, with the same latencies for all layers, `t_lo < t_hi`, errors `e_i(hi)`,
/// `e_i(lo)` and penalties `d_i = e_i(lo) - e_i(hi) > 0`. Under the latency budget
/// `L = n t_hi - m (t_hi - t_lo)` (exactly `m` layers' savings), a feasible assignment has at
/// least `m` layers in lo, and the minimum total error is
/// `sum_i e_i(hi) + (sum of the m smallest d_i)`, reached by putting exactly the `m` layers
/// with the smallest `d_i` in lo (unique when the `d_i` are distinct).
/// Corollary: when `e_i(hi)` is the same for every layer, ranking by `d_i` is ranking by
/// `e_i(lo)` = the paper's eps, so greedy-gamma with `gamma = m / n` returns that optimum;
/// when `e_i(hi)` varies, greedy can be strictly worse (tested below).
#[test]
fn uniform_latency_theorem() {
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng >> 11) as f64 / (1u64 << 53) as f64
    };
    for trial in 0..40 {
        let n = 3 + trial % 20;
        let uniform_hi = trial % 2 == 0;
        let (t_hi, t_lo) = (5e-6, 3e-6);
        let menus: Vec<Vec<(Format, f64, f64, u64)>> = (0..n)
            .map(|_| {
                let e_hi = if uniform_hi { 0.01 } else { 0.02 * next() };
                let d = 0.001 + 0.1 * next();
                vec![
                    (Format::Fp8, e_hi, t_hi, 100),
                    (Format::Nvfp4, e_hi + d, t_lo, 60),
                ]
            })
            .collect();
        let p = problem(&menus, &(0..n as u32).collect::<Vec<_>>());
        for m in 0..=n {
            let budget = n as f64 * t_hi - m as f64 * (t_hi - t_lo);
            let c = Constraints {
                target: Target::Latency { seconds: budget },
                memory: None,
            };
            let s = ilp(&p, &c, &EXACT).unwrap().solution;
            let d: Vec<f64> = (0..n).map(|i| menus[i][1].1 - menus[i][0].1).collect();
            let mut by_d: Vec<usize> = (0..n).collect();
            by_d.sort_by(|&a, &b| d[a].total_cmp(&d[b]));
            let mut want_lo: Vec<usize> = by_d[..m].to_vec();
            want_lo.sort();
            let got_lo: Vec<usize> = (0..n)
                .filter(|&i| p.precisions[s.choice[i]].weights == Format::Nvfp4)
                .collect();
            assert_eq!(got_lo, want_lo, "trial {trial}, n {n}, m {m}");
            let want: f64 = menus.iter().map(|l| l[0].1).sum::<f64>()
                + by_d[..m].iter().map(|&i| d[i]).sum::<f64>();
            assert!((s.totals.error - want).abs() < 1e-9 * want.max(1.0));
            if uniform_hi {
                let gamma = m as f64 / n as f64;
                let g = greedy(
                    &p,
                    &GreedyOptions::default(),
                    GreedyRule::Gamma(gamma),
                    None,
                )
                .unwrap()
                .solution;
                assert_eq!(
                    g.choice, s.choice,
                    "trial {trial}: greedy == ILP when e(hi) is uniform"
                );
            }
        }
    }
}

#[test]
fn greedy_is_strictly_worse_when_fp8_errors_differ() {
    // Uniform latencies; layer 0 has the lowest fp4 eps but also a tiny fp8 eps, so moving it
    // to fp4 costs most (d = 0.05 - 0.0 = 0.05); layer 1 costs 0.06 - 0.04 = 0.02.
    let menus = vec![
        vec![
            (Format::Fp8, 0.0, 2e-6, 100),
            (Format::Nvfp4, 0.05, 1e-6, 60),
        ],
        vec![
            (Format::Fp8, 0.04, 2e-6, 100),
            (Format::Nvfp4, 0.06, 1e-6, 60),
        ],
    ];
    let p = problem(&menus, &[0, 1]);
    let g = greedy(&p, &GreedyOptions::default(), GreedyRule::Gamma(0.5), None).unwrap();
    let c = Constraints {
        target: Target::Latency {
            seconds: g.solution.totals.latency,
        },
        memory: None,
    };
    let s = ilp(&p, &c, &EXACT).unwrap();
    assert!((g.solution.totals.error - 0.09).abs() < 1e-12);
    assert!((s.solution.totals.error - 0.06).abs() < 1e-12);
    assert_eq!(s.solution.choice, vec![0, 3]);
}

#[test]
fn error_target_is_the_mirror_problem() {
    // Least latency with total error <= 0.07, checked by hand and by exhaustive search.
    let menus = vec![
        vec![
            (Format::Fp8, 0.01, 4e-6, 100),
            (Format::Nvfp4, 0.05, 1e-6, 60),
        ],
        vec![
            (Format::Fp8, 0.01, 2e-6, 100),
            (Format::Nvfp4, 0.02, 1e-6, 60),
        ],
        vec![
            (Format::Fp8, 0.01, 2e-6, 100),
            (Format::Nvfp4, 0.03, 1e-6, 60),
        ],
    ];
    let p = problem(&menus, &[0, 1, 2]);
    let c = Constraints {
        target: Target::Error { error: 0.07 },
        memory: None,
    };
    let s = ilp(&p, &c, &EXACT).unwrap();
    // Layer 0 to fp4 saves 3 us for +0.04 (total 0.07): latency 5 us. Layers 1+2 save 2 us
    // for +0.03 (total 0.06): latency 6 us. The first is faster.
    assert_eq!(s.solution.choice, vec![1, 2, 4]);
    assert_eq!(exhaustive(&p, &c).unwrap().choice, s.solution.choice);
}

#[test]
fn empty_menus_and_bad_budgets_are_clear_errors() {
    let mut p = problem(
        &[
            vec![(Format::Fp8, 0.01, 2e-6, 100)],
            vec![(Format::Fp8, 0.01, 2e-6, 100)],
        ],
        &[0, 1],
    );
    p.offsets[2] = 1;
    p.precisions.truncate(1);
    p.error.truncate(1);
    p.eps.truncate(1);
    p.latency.truncate(1);
    p.bytes.truncate(1);
    let c = Constraints {
        target: Target::Latency { seconds: 1.0 },
        memory: None,
    };
    let e = ilp(&p, &c, &IlpOptions::default()).unwrap_err().to_string();
    assert_eq!(
        e,
        "layer `model.layers.1.mlp.down_proj`: no allowed format (the menu is empty for this layer)"
    );
    let p = problem(
        &[vec![
            (Format::Fp8, 0.01, 2e-6, 100),
            (Format::Nvfp4, 0.04, 1e-6, 60),
        ]],
        &[0],
    );
    let c = Constraints {
        target: Target::Error { error: 0.001 },
        memory: None,
    };
    let e = ilp(&p, &c, &IlpOptions::default()).unwrap_err().to_string();
    assert_eq!(
        e,
        "infeasible: the error budget 0.001000 is below the minimum achievable 0.010000 \
         (every layer in its most accurate allowed format)"
    );
}
