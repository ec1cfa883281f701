//! Rotary position embedding as a checkpoint defines it: the base `theta` and the frequency
//! scaling of `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5).
//!
//! [`Rope::inv_freq`] is the one place fpx computes RoPE's inverse frequencies: the CPU
//! reference and the tables every backend's kernels read (`runtime::cpu::kernels::rope_tables`)
//! derive from it. The arithmetic follows transformers' `modeling_rope_utils.py`
//! (`_compute_linear_scaling_rope_parameters`, `_compute_llama3_parameters`) operation for
//! operation in f32, as torch computes it. Other scaling types are refused when the config is
//! read (`config.rs`), by name.
//!
//! GGUF files carry llama3 scaling as llama.cpp does, as a `rope_freqs` tensor of one factor
//! per frequency that the frequency is divided by ([`RopeScaling::Factors`]);
//! [`RopeScaling::llama_cpp_factors`] computes that tensor from llama3 parameters exactly as
//! `convert_hf_to_gguf.py` writes it, so the two spellings can be checked against each other.

use serde::{Deserialize, Serialize};

/// How the inverse frequencies are adjusted after `theta^(-2i/d)`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "snake_case")]
pub enum RopeScaling {
    /// `rope_type = "default"`: no adjustment.
    #[default]
    Default,
    /// Every frequency divided by `factor` (positions interpolated).
    Linear { factor: f32 },
    /// Llama 3.1: wavelengths longer than `original_max_position_embeddings / low_freq_factor`
    /// divided by `factor`, shorter than `original_max_position_embeddings / high_freq_factor`
    /// kept, a linear blend between.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
    /// llama.cpp's `rope_freqs` tensor (GGUF): frequency `i` divided by `factors[i]`, one
    /// factor per rotated pair (`head_dim / 2`).
    Factors { factors: Vec<f32> },
    /// YaRN (Qwen2.5/Qwen3 long-context configs, DeepSeek): frequencies of pairs below the
    /// correction range (from `beta_fast` / `beta_slow` rotations over the original context)
    /// kept, above it divided by `factor`, a linear ramp between; cos and sin scaled by
    /// `attention_factor` (resolved from `factor`, `mscale` and `mscale_all_dim` when the
    /// config does not give it).
    Yarn {
        factor: f32,
        original_max_position_embeddings: usize,
        beta_fast: f32,
        beta_slow: f32,
        attention_factor: f32,
        /// Round the correction range outwards to whole pairs (transformers' default).
        truncate: bool,
    },
}

impl RopeScaling {
    /// No scaling (serde skips the field then, so specs without scaling serialize, and hash
    /// into model identities, exactly as before the field existed).
    pub fn is_default(&self) -> bool {
        *self == RopeScaling::Default
    }

    /// The `rope_type` name transformers uses.
    pub fn rope_type(&self) -> &'static str {
        match self {
            RopeScaling::Default => "default",
            RopeScaling::Linear { .. } => "linear",
            RopeScaling::Llama3 { .. } => "llama3",
            RopeScaling::Factors { .. } => "factors",
            RopeScaling::Yarn { .. } => "yarn",
        }
    }

    /// The `rope_freqs` tensor llama.cpp's converter writes for this scaling (llama3 only:
    /// `None` otherwise), in its arithmetic: factor 1 for short wavelengths, `factor` for long
    /// ones, `1 / ((1 - smooth) / factor + smooth)` between.
    pub fn llama_cpp_factors(&self, theta: f32, head_dim: usize) -> Option<Vec<f32>> {
        let RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } = *self
        else {
            return None;
        };
        let old_ctx = original_max_position_embeddings as f32;
        let (low_wavelen, high_wavelen) = (old_ctx / low_freq_factor, old_ctx / high_freq_factor);
        let factors = Rope::plain(theta)
            .inv_freq(head_dim)
            .into_iter()
            .map(|f| {
                let wavelen = 2.0 * std::f32::consts::PI / f;
                if wavelen < high_wavelen {
                    1.0
                } else if wavelen > low_wavelen {
                    factor
                } else {
                    let smooth = (old_ctx / wavelen - low_freq_factor)
                        / (high_freq_factor - low_freq_factor);
                    1.0 / ((1.0 - smooth) / factor + smooth)
                }
            })
            .collect();
        Some(factors)
    }

    /// Rules the parameters obey (the division by `high_freq_factor - low_freq_factor` and
    /// by `factor` must be defined); the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        let positive = |name: &str, v: f32| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(format!("rope_scaling.{name} = {v} must be positive"))
            }
        };
        match *self {
            RopeScaling::Default => Ok(()),
            RopeScaling::Linear { factor } => positive("factor", factor),
            RopeScaling::Factors { ref factors } => {
                match factors.iter().position(|&f| !(f.is_finite() && f > 0.0)) {
                    Some(i) => Err(format!("rope_freqs[{i}] = {} must be positive", factors[i])),
                    None => Ok(()),
                }
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                attention_factor,
                ..
            } => {
                positive("factor", factor)?;
                positive("beta_fast", beta_fast)?;
                positive("beta_slow", beta_slow)?;
                positive("attention_factor", attention_factor)?;
                if original_max_position_embeddings == 0 {
                    return Err("rope_scaling.original_max_position_embeddings must be > 0".into());
                }
                Ok(())
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                positive("factor", factor)?;
                positive("low_freq_factor", low_freq_factor)?;
                positive("high_freq_factor", high_freq_factor)?;
                if high_freq_factor <= low_freq_factor {
                    return Err(format!(
                        "rope_scaling.high_freq_factor = {high_freq_factor} must be greater than \
                         low_freq_factor = {low_freq_factor}"
                    ));
                }
                if original_max_position_embeddings == 0 {
                    return Err("rope_scaling.original_max_position_embeddings must be > 0".into());
                }
                Ok(())
            }
        }
    }
}

/// RoPE of a model: base and scaling.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rope {
    pub theta: f32,
    pub scaling: RopeScaling,
}

impl Rope {
    /// Unscaled RoPE with base `theta`.
    pub fn plain(theta: f32) -> Rope {
        Rope {
            theta,
            scaling: RopeScaling::Default,
        }
    }

    /// What cos and sin are multiplied by (YaRN's attention factor; 1 otherwise).
    pub fn attention_factor(&self) -> f32 {
        match self.scaling {
            RopeScaling::Yarn {
                attention_factor, ..
            } => attention_factor,
            _ => 1.0,
        }
    }

    /// The `head_dim / 2` inverse frequencies: `theta^(-2i/head_dim)`, then the scaling.
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f32> {
        let base: Vec<f32> = (0..head_dim / 2)
            .map(|i| 1.0 / self.theta.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        match self.scaling {
            RopeScaling::Default => base,
            RopeScaling::Linear { factor } => base.into_iter().map(|f| f / factor).collect(),
            RopeScaling::Factors { ref factors } => {
                base.into_iter().zip(factors).map(|(f, d)| f / d).collect()
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old_ctx = original_max_position_embeddings as f32;
                let low_freq_wavelen = old_ctx / low_freq_factor;
                let high_freq_wavelen = old_ctx / high_freq_factor;
                base.into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen > low_freq_wavelen {
                            f / factor
                        } else if wavelen < high_freq_wavelen {
                            f
                        } else {
                            let smooth = (old_ctx / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                truncate,
                ..
            } => {
                // transformers' `_compute_yarn_parameters`: the range in f64 (Python floats),
                // the frequencies in f32 (torch).
                let (dim, theta) = (head_dim as f64, self.theta as f64);
                let correction_dim = |rotations: f32| {
                    let turns = original_max_position_embeddings as f64
                        / (rotations as f64 * 2.0 * std::f64::consts::PI);
                    dim * turns.ln() / (2.0 * theta.ln())
                };
                let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
                if truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
                if low == high {
                    high += 0.001;
                }
                (0..head_dim / 2)
                    .map(|i| {
                        let pos_freq = self.theta.powf((2 * i) as f32 / head_dim as f32);
                        let (extrapolated, interpolated) =
                            (1.0 / pos_freq, 1.0 / (factor * pos_freq));
                        let ramp = ((i as f32 - low as f32) / (high - low) as f32).clamp(0.0, 1.0);
                        let keep = 1.0 - ramp;
                        interpolated * (1.0 - keep) + extrapolated * keep
                    })
                    .collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama3(original: usize) -> Rope {
        Rope {
            theta: 500_000.0,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: original,
            },
        }
    }

    #[test]
    fn llama3_keeps_high_divides_low_and_blends_between() {
        let plain = Rope::plain(500_000.0).inv_freq(128);
        let scaled = llama3(8192).inv_freq(128);
        let wavelen = |f: f32| 2.0 * std::f32::consts::PI / f;
        let (mut kept, mut divided, mut blended) = (0, 0, 0);
        for (&p, &s) in plain.iter().zip(&scaled) {
            if wavelen(p) < 8192.0 / 4.0 {
                assert_eq!(s, p);
                kept += 1;
            } else if wavelen(p) > 8192.0 {
                assert_eq!(s, p / 8.0);
                divided += 1;
            } else {
                assert!(s < p && s > p / 8.0, "{s} between {p} and {}", p / 8.0);
                blended += 1;
            }
        }
        // Llama 3.1 8B's head_dim 128 has frequencies in all three bands.
        assert!(
            kept > 0 && divided > 0 && blended > 0,
            "{kept} {divided} {blended}"
        );
    }

    #[test]
    fn linear_divides_every_frequency() {
        let plain = Rope::plain(10_000.0).inv_freq(16);
        let lin = Rope {
            theta: 10_000.0,
            scaling: RopeScaling::Linear { factor: 4.0 },
        }
        .inv_freq(16);
        for (p, l) in plain.iter().zip(&lin) {
            assert_eq!(*l, p / 4.0);
        }
    }

    #[test]
    fn validation_names_the_field() {
        let bad = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 4.0,
            high_freq_factor: 1.0,
            original_max_position_embeddings: 8192,
        };
        assert!(bad.validate().unwrap_err().contains("high_freq_factor"));
        let bad = RopeScaling::Linear { factor: 0.0 };
        assert!(bad.validate().unwrap_err().contains("rope_scaling.factor"));
        assert!(llama3(16).scaling.validate().is_ok());
    }

    #[test]
    fn llama_cpp_factors_give_the_llama3_frequencies() {
        let rope = llama3(64);
        let factors = rope.scaling.llama_cpp_factors(rope.theta, 16).unwrap();
        let gguf = Rope {
            theta: rope.theta,
            scaling: RopeScaling::Factors { factors },
        };
        for (a, b) in rope.inv_freq(16).iter().zip(gguf.inv_freq(16)) {
            assert!((a - b).abs() <= 2.0 * f32::EPSILON * a, "{a} vs {b}");
        }
        assert!(RopeScaling::Linear { factor: 2.0 }
            .llama_cpp_factors(1e4, 16)
            .is_none());
        let bad = RopeScaling::Factors {
            factors: vec![1.0, 0.0],
        };
        assert!(bad.validate().unwrap_err().contains("rope_freqs[1]"));
    }

    #[test]
    fn default_scaling_is_skipped_and_round_trips() {
        let s = llama3(16).scaling;
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["rope_type"], "llama3");
        assert_eq!(serde_json::from_value::<RopeScaling>(json).unwrap(), s);
    }
}
