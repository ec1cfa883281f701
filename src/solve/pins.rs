//! Pins: rules forcing a format on some layers, from a small TOML file.
//!
//! ```toml
//! # keep the first and last blocks' MLP down projections in fp8
//! [[pin]]
//! layers = "0-1"          # decoder blocks, inclusive range, or one block: "29"
//! kinds = ["down"]        # optional: q, k, v, o, gate, up, down
//! format = "fp8"
//!
//! [[pin]]
//! name = 'self_attn\.v_proj$'   # regex, searched in the layer name
//! format = "fp16"
//!
//! [[pin]]
//! name = 'mlp\.down_proj$'
//! format = "w8a8"         # a precision: weights, or weights+activations ("fp8+fp8")
//! ```
//!
//! A rule needs `name` or `layers` (or both: a layer must match all given fields). Parsing
//! goes in two steps, like mistral.rs topology files: the file into [`RawPinFile`] (plain
//! strings, unknown keys rejected), then into typed [`PinRule`]s (compiled regex, parsed
//! range, [`LinearPrecision`], [`LinearKind`]), every error naming the file and the rule. Applying
//! the rules ([`Pins::resolve`]) refuses a layer that two rules pin to different formats,
//! naming the layer and both rules; a rule that matches no layer is reported back, not an
//! error (a pin on `lm_head`, which plans do not cover, is harmless).

use std::path::{Path, PathBuf};

use regex::Regex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::ir::LinearKind;
use crate::lower::LinearPrecision;

/// The file exactly as written.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPinFile {
    #[serde(default)]
    pub pin: Vec<RawPin>,
}

/// One `[[pin]]` table, as strings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPin {
    pub name: Option<String>,
    pub layers: Option<String>,
    pub kinds: Option<Vec<String>>,
    pub format: String,
}

/// A validated rule.
#[derive(Debug, Clone)]
pub struct PinRule {
    /// `rule N (name = "...", layers = "...")`, for messages.
    pub label: String,
    pub name: Option<Regex>,
    /// Inclusive range of decoder blocks.
    pub layers: Option<(usize, usize)>,
    pub kinds: Option<Vec<LinearKind>>,
    pub format: LinearPrecision,
}

/// The rules of one pins file.
#[derive(Debug, Clone)]
pub struct Pins {
    pub path: PathBuf,
    /// SHA-256 of the file's bytes (recorded in plans).
    pub sha256: String,
    pub rules: Vec<PinRule>,
}

/// Where a pin applies: what the planner knows of a layer.
#[derive(Debug, Clone, Copy)]
pub struct PinTarget<'a> {
    pub name: &'a str,
    pub layer: usize,
    pub kind: LinearKind,
}

/// The outcome of applying the rules to a model's layers.
#[derive(Debug, Clone, PartialEq)]
pub struct PinResolution {
    /// Per layer: the pinned format and the index of the first rule that pinned it.
    pub pinned: Vec<Option<(LinearPrecision, usize)>>,
    /// Labels of rules that matched no layer.
    pub unmatched: Vec<String>,
}

const KINDS: [LinearKind; 7] = [
    LinearKind::Q,
    LinearKind::K,
    LinearKind::V,
    LinearKind::O,
    LinearKind::Gate,
    LinearKind::Up,
    LinearKind::Down,
];

fn parse_range(s: &str) -> Option<(usize, usize)> {
    let s = s.trim();
    let (a, b) = match s.split_once('-') {
        Some((a, b)) => (a.trim().parse().ok()?, b.trim().parse().ok()?),
        None => {
            let v = s.parse().ok()?;
            (v, v)
        }
    };
    (a <= b).then_some((a, b))
}

impl PinRule {
    /// Types one raw rule (`index` counts from 1, as users read the file).
    pub fn from_raw(raw: &RawPin, index: usize) -> std::result::Result<PinRule, String> {
        let mut desc = Vec::new();
        if let Some(n) = &raw.name {
            desc.push(format!("name = {n:?}"));
        }
        if let Some(l) = &raw.layers {
            desc.push(format!("layers = {l:?}"));
        }
        let label = format!("rule {index} ({})", desc.join(", "));
        let fail = |reason: String| Err(format!("rule {index}: {reason}"));
        if raw.name.is_none() && raw.layers.is_none() {
            return fail("give `name` (a regex) or `layers` (a block range), or both".into());
        }
        let name = match &raw.name {
            Some(n) => match Regex::new(n) {
                Ok(r) => Some(r),
                Err(e) => return fail(format!("`name` is not a valid regex: {e}")),
            },
            None => None,
        };
        let layers = match &raw.layers {
            Some(l) => match parse_range(l) {
                Some(r) => Some(r),
                None => {
                    return fail(format!(
                        "`layers` = {l:?} is not a block number or an inclusive range like \"0-3\""
                    ))
                }
            },
            None => None,
        };
        let kinds = match &raw.kinds {
            Some(ks) => {
                let mut out = Vec::new();
                for k in ks {
                    match KINDS
                        .iter()
                        .find(|x| x.name().eq_ignore_ascii_case(k.trim()))
                    {
                        Some(&kind) => out.push(kind),
                        None => {
                            return fail(format!(
                                "unknown kind `{k}` (expected q, k, v, o, gate, up, down)"
                            ))
                        }
                    }
                }
                Some(out)
            }
            None => None,
        };
        let format: LinearPrecision = match raw.format.parse() {
            Ok(f) => f,
            Err(e) => return fail(e.to_string()),
        };
        Ok(PinRule {
            label,
            name,
            layers,
            kinds,
            format,
        })
    }

    /// Whether the rule applies to `t`.
    pub fn matches(&self, t: &PinTarget) -> bool {
        self.name.as_ref().is_none_or(|r| r.is_match(t.name))
            && self.layers.is_none_or(|(a, b)| (a..=b).contains(&t.layer))
            && self.kinds.as_ref().is_none_or(|ks| ks.contains(&t.kind))
    }
}

impl Pins {
    /// Reads and validates a pins file.
    pub fn read(path: &Path) -> Result<Pins> {
        let bytes = crate::fsutil::read_regular(path)?;
        Pins::parse(&bytes, path)
    }

    /// Validates the bytes of a pins file; `path` is for messages.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Pins> {
        let err = |reason: String| Error::File {
            path: path.to_path_buf(),
            what: "pins",
            reason,
        };
        let text = std::str::from_utf8(bytes).map_err(|e| err(format!("not UTF-8: {e}")))?;
        let raw: RawPinFile = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        let rules = raw
            .pin
            .iter()
            .enumerate()
            .map(|(i, r)| PinRule::from_raw(r, i + 1).map_err(&err))
            .collect::<Result<Vec<_>>>()?;
        Ok(Pins {
            path: path.to_path_buf(),
            sha256: format!("{:x}", Sha256::digest(bytes)),
            rules,
        })
    }

    /// Applies the rules to `targets`. Two rules pinning one layer to different formats are
    /// an error naming the layer and both rules.
    pub fn resolve(&self, targets: &[PinTarget]) -> Result<PinResolution> {
        let mut pinned: Vec<Option<(LinearPrecision, usize)>> = vec![None; targets.len()];
        let mut used = vec![false; self.rules.len()];
        for (i, t) in targets.iter().enumerate() {
            for (r, rule) in self.rules.iter().enumerate() {
                if !rule.matches(t) {
                    continue;
                }
                used[r] = true;
                match pinned[i] {
                    None => pinned[i] = Some((rule.format, r)),
                    Some((f, first)) if f != rule.format => {
                        return Err(Error::File {
                            path: self.path.clone(),
                            what: "pins",
                            reason: format!(
                                "layer `{}` is pinned to {f} by {} and to {} by {}",
                                t.name, self.rules[first].label, rule.format, rule.label
                            ),
                        });
                    }
                    Some(_) => {}
                }
            }
        }
        let unmatched = self
            .rules
            .iter()
            .zip(&used)
            .filter(|(_, &u)| !u)
            .map(|(r, _)| r.label.clone())
            .collect();
        Ok(PinResolution { pinned, unmatched })
    }
}

/// The pins file as recorded in a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PinsRef {
    pub path: String,
    pub sha256: String,
}

impl From<&Pins> for PinsRef {
    fn from(p: &Pins) -> PinsRef {
        PinsRef {
            path: p.path.display().to_string(),
            sha256: p.sha256.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets() -> Vec<(String, usize, LinearKind)> {
        (0..4)
            .flat_map(|l| {
                [
                    (
                        format!("model.layers.{l}.self_attn.v_proj"),
                        l,
                        LinearKind::V,
                    ),
                    (
                        format!("model.layers.{l}.mlp.down_proj"),
                        l,
                        LinearKind::Down,
                    ),
                ]
            })
            .collect()
    }

    fn resolve(text: &str) -> Result<PinResolution> {
        let t = targets();
        let t: Vec<PinTarget> = t
            .iter()
            .map(|(name, layer, kind)| PinTarget {
                name,
                layer: *layer,
                kind: *kind,
            })
            .collect();
        Pins::parse(text.as_bytes(), Path::new("pins.toml"))?.resolve(&t)
    }

    #[test]
    fn regex_and_range_rules_pin_layers() {
        let r = resolve(
            r#"
            [[pin]]
            layers = "0-1"
            kinds = ["down"]
            format = "fp8"
            [[pin]]
            name = 'layers\.3\.self_attn'
            format = "fp16"
            [[pin]]
            name = "lm_head"
            format = "fp16"
            "#,
        )
        .unwrap();
        use crate::formats::Format;
        let f: Vec<Option<Format>> = r.pinned.iter().map(|p| p.map(|x| x.0.weights)).collect();
        use Format::*;
        assert_eq!(
            f,
            vec![
                None,
                Some(Fp8),
                None,
                Some(Fp8),
                None,
                None,
                Some(Fp16),
                None
            ]
        );
        assert_eq!(
            r.unmatched,
            vec![r#"rule 3 (name = "lm_head")"#.to_string()]
        );
    }

    #[test]
    fn contradictory_pins_name_the_layer_and_both_rules() {
        let e = resolve(
            r#"
            [[pin]]
            name = "down_proj"
            format = "fp8"
            [[pin]]
            layers = "2"
            format = "nvfp4"
            "#,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "pins.toml: pins: layer `model.layers.2.mlp.down_proj` is pinned to fp8 by rule 1 \
             (name = \"down_proj\") and to nvfp4 by rule 2 (layers = \"2\")"
        );
    }

    #[test]
    fn bad_rules_are_rejected_with_the_file_and_rule() {
        let cases = [
            ("[[pin]]\nformat = \"fp8\"", "rule 1: give `name`"),
            (
                "[[pin]]\nname = \"(\"\nformat = \"fp8\"",
                "rule 1: `name` is not a valid regex",
            ),
            (
                "[[pin]]\nlayers = \"3-1\"\nformat = \"fp8\"",
                "not a block number",
            ),
            (
                "[[pin]]\nlayers = \"1\"\nformat = \"fp5\"",
                "unknown format `fp5`",
            ),
            (
                "[[pin]]\nlayers = \"1\"\nkinds = [\"qkv\"]\nformat = \"fp8\"",
                "unknown kind `qkv`",
            ),
            (
                "[[pin]]\nlayer = \"1\"\nformat = \"fp8\"",
                "unknown field `layer`",
            ),
        ];
        for (text, want) in cases {
            let e = resolve(text).unwrap_err().to_string();
            assert!(
                e.starts_with("pins.toml: pins:") && e.contains(want),
                "{e} lacks {want}"
            );
        }
    }
}
