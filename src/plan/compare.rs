//! Comparing two plans: the layers whose format differs (or that only one plan assigns),
//! in the first plan's layer order, then the second plan's extra layers.

use serde::Serialize;

use crate::formats::Format;

use super::{Plan, PlanLayer};

/// One layer the two plans disagree on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerDiff {
    pub name: String,
    /// Format in the first plan (`None`: not assigned there).
    pub a: Option<Format>,
    pub b: Option<Format>,
    pub eps_a: Option<f64>,
    pub eps_b: Option<f64>,
    pub latency_a: Option<f64>,
    pub latency_b: Option<f64>,
}

/// The difference of two plans.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanDiff {
    pub layers_a: usize,
    pub layers_b: usize,
    /// Layers both plans assign the same format.
    pub same: usize,
    pub differing: Vec<LayerDiff>,
}

fn diff(name: &str, a: Option<&PlanLayer>, b: Option<&PlanLayer>) -> LayerDiff {
    LayerDiff {
        name: name.to_string(),
        a: a.map(|l| l.format),
        b: b.map(|l| l.format),
        eps_a: a.and_then(|l| l.eps),
        eps_b: b.and_then(|l| l.eps),
        latency_a: a.and_then(|l| l.latency),
        latency_b: b.and_then(|l| l.latency),
    }
}

/// The layers where `a` and `b` differ.
pub fn compare(a: &Plan, b: &Plan) -> PlanDiff {
    let find = |p: &'_ Plan, name: &str| p.layers.iter().position(|l| l.name == name);
    let mut same = 0;
    let mut differing = Vec::new();
    for la in &a.layers {
        let lb = find(b, &la.name).map(|i| &b.layers[i]);
        match lb {
            Some(lb) if lb.format == la.format && lb.activations == la.activations => same += 1,
            _ => differing.push(diff(&la.name, Some(la), lb)),
        }
    }
    for lb in &b.layers {
        if find(a, &lb.name).is_none() {
            differing.push(diff(&lb.name, None, Some(lb)));
        }
    }
    PlanDiff {
        layers_a: a.layers.len(),
        layers_b: b.layers.len(),
        same,
        differing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(layers: &[(&str, Format)]) -> Plan {
        Plan {
            schema_version: super::super::SCHEMA_VERSION,
            model: None,
            provenance: None,
            totals: None,
            layers: layers
                .iter()
                .map(|&(name, format)| PlanLayer {
                    name: name.into(),
                    format,
                    activations: None,
                    eps: None,
                    error: None,
                    latency: None,
                    weight_bytes: None,
                })
                .collect(),
        }
    }

    #[test]
    fn lists_changed_and_one_sided_layers() {
        use Format::*;
        let a = plan(&[("x", Fp8), ("y", Nvfp4), ("z", Fp8)]);
        let b = plan(&[("w", Fp16), ("y", Fp8), ("x", Fp8)]);
        let d = compare(&a, &b);
        assert_eq!(d.same, 1);
        let got: Vec<(&str, Option<Format>, Option<Format>)> = d
            .differing
            .iter()
            .map(|l| (l.name.as_str(), l.a, l.b))
            .collect();
        assert_eq!(
            got,
            vec![
                ("y", Some(Nvfp4), Some(Fp8)),
                ("z", Some(Fp8), None),
                ("w", None, Some(Fp16))
            ]
        );
    }
}
