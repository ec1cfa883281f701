//! Decision units: a group of layers that must share a precision, with the precisions all its
//! members allow and the summed error, latency and bytes of each. Every solver decides per
//! unit; ungrouped layers are units of one.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::lower::LinearPrecision;

use super::{Problem, Solution};

/// One precision for a whole unit.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct UnitOption {
    pub precision: LinearPrecision,
    /// The member layers' choice indices, in member order.
    pub choices: Vec<usize>,
    pub error: f64,
    pub eps: f64,
    pub latency: f64,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Unit {
    /// Layer indices, ascending.
    pub members: Vec<usize>,
    /// In the first member's menu order.
    pub options: Vec<UnitOption>,
}

impl Unit {
    pub fn option(&self, f: LinearPrecision) -> Option<usize> {
        self.options.iter().position(|o| o.precision == f)
    }
}

/// Groups the layers into units, in order of each group's first layer. A group whose members
/// have no format in common is an error naming them.
pub(crate) fn units(p: &Problem) -> Result<Vec<Unit>> {
    let mut by_group: BTreeMap<u32, usize> = BTreeMap::new();
    let mut members: Vec<Vec<usize>> = Vec::new();
    for (i, &g) in p.groups.iter().enumerate() {
        let u = *by_group.entry(g).or_insert_with(|| {
            members.push(Vec::new());
            members.len() - 1
        });
        members[u].push(i);
    }
    members
        .into_iter()
        .map(|members| {
            let first = members[0];
            let options: Vec<UnitOption> = p
                .choices(first)
                .filter_map(|c| {
                    let precision = p.precisions[c];
                    let choices = members
                        .iter()
                        .map(|&i| p.choice_of(i, precision))
                        .collect::<Option<Vec<usize>>>()?;
                    let t = p.totals(&choices);
                    Some(UnitOption {
                        precision,
                        choices,
                        error: t.error,
                        eps: t.eps,
                        latency: t.latency,
                        bytes: t.bytes,
                    })
                })
                .collect();
            if options.is_empty() {
                let names: Vec<String> = members
                    .iter()
                    .map(|&i| {
                        let menu: Vec<String> =
                            p.choices(i).map(|c| p.precisions[c].to_string()).collect();
                        format!("`{}` ({})", p.names[i], menu.join(","))
                    })
                    .collect();
                return Err(Error::Infeasible {
                    reason: format!(
                        "layers that must share a format have none in common: {}",
                        names.join(", ")
                    ),
                });
            }
            Ok(Unit { members, options })
        })
        .collect()
}

/// Expands one option index per unit into a solution.
pub(crate) fn expand(p: &Problem, units: &[Unit], picks: &[usize]) -> Solution {
    let mut choice = vec![0; p.len()];
    for (u, &k) in units.iter().zip(picks) {
        for (&i, &c) in u.members.iter().zip(&u.options[k].choices) {
            choice[i] = c;
        }
    }
    p.solution(choice)
}

/// The smallest achievable total of `f` over all assignments (each unit at its minimum).
pub(crate) fn min_total(units: &[Unit], f: impl Fn(&UnitOption) -> f64) -> f64 {
    units
        .iter()
        .map(|u| u.options.iter().map(&f).fold(f64::INFINITY, f64::min))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::Format;
    use crate::solve::testing::two_format;

    #[test]
    fn groups_sum_their_members_and_need_a_common_format() {
        let mut p = two_format(&[
            (0.1, 0.2, 2.0, 1.0),
            (0.3, 0.4, 3.0, 1.5),
            (0.0, 0.1, 1.0, 1.0),
        ]);
        p.groups = vec![7, 3, 7];
        let u = units(&p).unwrap();
        assert_eq!(u.len(), 2);
        assert_eq!(u[0].members, vec![0, 2]);
        assert!((u[0].options[1].error - 0.3).abs() < 1e-12);
        assert_eq!(u[0].options[1].latency, 2.0);
        let s = expand(&p, &u, &[1, 0]);
        assert_eq!(s.choice, vec![1, 2, 5]);
        // Layer 2 loses fp8 and layer 0 loses nvfp4: nothing in common.
        p.precisions[4] = LinearPrecision::weight_only(Format::Mxfp4);
        p.precisions[1] = LinearPrecision::weight_only(Format::Fp16);
        let e = units(&p).unwrap_err().to_string();
        assert!(
            e.contains("`model.layers.0.mlp.down_proj` (fp8,fp16)"),
            "{e}"
        );
    }
}
