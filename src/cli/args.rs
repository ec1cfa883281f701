//! Checks on command-line values shared by the subcommands: clap value parsers that refuse
//! non-finite numbers at parse time (clap's own `f64` parser accepts `nan` and `inf`), one
//! parser for comma-separated format lists that refuses repeats, and window lengths checked
//! against the model's context.

use anyhow::{bail, Context, Result};

use fpx::formats::Format;
use fpx::lower::LinearPrecision;
use fpx::model::Model;

/// A finite `f64` (no NaN, no infinity).
/// `--act-dtype` of the commands that execute a plan: the checkpoint's type when not given.
#[derive(clap::Args, Clone, Copy)]
pub(crate) struct ActDtypeArg {
    /// Element type of activations and KV cache: f32, bf16 or f16 (default: the type of the
    /// checkpoint's embedding table: f32 and f16 as stored, bf16 for BF16 and for quantized
    /// GGUF storage).
    #[arg(long = "act-dtype", value_enum)]
    pub act_dtype: Option<fpx::lower::ActDtype>,
}

impl ActDtypeArg {
    pub fn resolve(self, graph: &fpx::ir::Graph, model: &Model) -> fpx::lower::ActDtype {
        self.act_dtype
            .unwrap_or_else(|| fpx::lower::ActDtype::of_checkpoint(graph, model.weights.as_ref()))
    }
}

pub(crate) fn finite(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|e| format!("{e}"))?;
    if !v.is_finite() {
        return Err(format!("{s} is not a finite number"));
    }
    Ok(v)
}

/// A finite `f32`.
pub(crate) fn finite_f32(s: &str) -> Result<f32, String> {
    let v = finite(s)? as f32;
    if !v.is_finite() {
        return Err(format!("{s} is outside the range of a 32-bit float"));
    }
    Ok(v)
}

/// Parses a `--formats`-style list, refusing an empty list and repeated formats.
pub(crate) fn formats(flag: &str, names: &[String]) -> Result<Vec<Format>> {
    distinct(flag, names)
}

/// Planner menu entries (`fp8`, `fp8+fp8`, `w8a8`, ...) given by `flag`, each at most once.
pub(crate) fn precisions(flag: &str, names: &[String]) -> Result<Vec<LinearPrecision>> {
    distinct(flag, names)
}

fn distinct<T>(flag: &str, names: &[String]) -> Result<Vec<T>>
where
    T: std::str::FromStr<Err = fpx::error::Error> + PartialEq + std::fmt::Display,
{
    let mut out: Vec<T> = Vec::with_capacity(names.len());
    for name in names {
        let f: T = name.parse().with_context(|| flag.to_string())?;
        if out.contains(&f) {
            bail!("{flag}: {f} is listed twice");
        }
        out.push(f);
    }
    if out.is_empty() {
        bail!("{flag}: give at least one format");
    }
    Ok(out)
}

/// Refuses a window of `len` tokens (given by `flag`) longer than the model's context, or
/// shorter than the 2 tokens a prediction needs.
pub(crate) fn window(flag: &str, len: usize, model: &Model) -> Result<()> {
    if len < 2 {
        bail!("{flag} {len}: a window needs at least 2 tokens");
    }
    let context = model.spec.max_position_embeddings;
    if len > context {
        bail!(
            "{flag} {len} is longer than the model's context of {context} tokens ({})",
            model.path.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_numbers_and_repeated_formats_are_refused() {
        assert_eq!(finite("0.5"), Ok(0.5));
        for bad in ["nan", "inf", "-inf", "NaN", "1e999"] {
            assert!(finite(bad).is_err(), "{bad}");
        }
        assert!(finite_f32("1e39").is_err());
        let list = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(formats("--formats", &list(&["fp8", "fp8"]))
            .unwrap_err()
            .to_string()
            .contains("fp8 is listed twice"));
        assert_eq!(
            formats("--formats", &list(&["fp8", "nvfp4"])).unwrap(),
            vec![Format::Fp8, Format::Nvfp4]
        );
    }
}
