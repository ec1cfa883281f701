//! Tera rendering of kernel sources. The templates (templates/*.cu.tera) and the helper
//! headers (kernels/*.cuh) are embedded in the binary, so codegen works from any directory;
//! the headers are handed to NVRTC (and written next to the sources by `fpx codegen`) as an
//! include directory. Rendering is a pure function of (spec, arch): no clocks, no paths, no
//! hash-map iteration, so the same inputs give byte-identical sources.

use std::sync::Arc;

use serde::Serialize;
use tera::Tera;

use super::context::KernelContext;
use crate::error::{Error, Result};
use crate::lower::Arch;
use crate::lower::KernelSpec;

/// The kernel templates, by file name.
pub const TEMPLATES: [(&str, &str); 12] = [
    (
        "macros.cu.tera",
        include_str!("../../templates/macros.cu.tera"),
    ),
    ("gemv.cu.tera", include_str!("../../templates/gemv.cu.tera")),
    ("gemm.cu.tera", include_str!("../../templates/gemm.cu.tera")),
    (
        "embedding.cu.tera",
        include_str!("../../templates/embedding.cu.tera"),
    ),
    (
        "rmsnorm.cu.tera",
        include_str!("../../templates/rmsnorm.cu.tera"),
    ),
    (
        "rope_kv.cu.tera",
        include_str!("../../templates/rope_kv.cu.tera"),
    ),
    (
        "attention.cu.tera",
        include_str!("../../templates/attention.cu.tera"),
    ),
    (
        "silu_mul.cu.tera",
        include_str!("../../templates/silu_mul.cu.tera"),
    ),
    (
        "argmax.cu.tera",
        include_str!("../../templates/argmax.cu.tera"),
    ),
    (
        "moe_route.cu.tera",
        include_str!("../../templates/moe_route.cu.tera"),
    ),
    (
        "moe_combine.cu.tera",
        include_str!("../../templates/moe_combine.cu.tera"),
    ),
    (
        "quant_fp8.cu.tera",
        include_str!("../../templates/quant_fp8.cu.tera"),
    ),
];

/// The hand-written helper headers every kernel includes, by file name.
pub const HEADERS: [(&str, &str); 3] = [
    (
        "fpx_common.cuh",
        include_str!("../../kernels/fpx_common.cuh"),
    ),
    (
        "fpx_formats.cuh",
        include_str!("../../kernels/fpx_formats.cuh"),
    ),
    ("fpx_mma.cuh", include_str!("../../kernels/fpx_mma.cuh")),
];

/// The helper headers a kernel was rendered against: the embedded [`HEADERS`], unless a
/// renderer with overrides replaced one (to check that a broken decoder is caught).
#[derive(Clone, PartialEq, Eq)]
pub struct HelperHeaders(Arc<Vec<(String, String)>>);

impl HelperHeaders {
    /// The embedded kernels/*.cuh.
    pub fn embedded() -> HelperHeaders {
        HelperHeaders::with_overrides(&[])
    }

    fn with_overrides(overrides: &[(&str, &str)]) -> HelperHeaders {
        HelperHeaders(Arc::new(
            overridden(&HEADERS, overrides)
                .map(|(name, text)| (name.to_string(), text.to_string()))
                .collect(),
        ))
    }

    /// (file name, text) of each header.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, t)| (n.as_str(), t.as_str()))
    }

    /// Whether these are the embedded headers, unchanged.
    pub fn is_embedded(&self) -> bool {
        self.iter().eq(HEADERS.iter().copied())
    }
}

impl std::fmt::Debug for HelperHeaders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.is_embedded() {
            "embedded"
        } else {
            "overridden"
        };
        write!(f, "HelperHeaders({kind})")
    }
}

impl Default for HelperHeaders {
    fn default() -> Self {
        HelperHeaders::embedded()
    }
}

/// One rendered kernel: its spec, target, source and entry points.
#[derive(Debug, Clone, Serialize)]
pub struct KernelSource {
    pub spec: KernelSpec,
    pub arch: Arch,
    /// [`KernelSpec::name`].
    pub name: String,
    /// `<name>.cu`.
    pub file_name: String,
    pub source: String,
    pub entry_points: Vec<String>,
    /// The values the template printed (also gives the launch dimensions).
    #[serde(skip)]
    pub context: KernelContext,
    /// The helper headers the source includes.
    #[serde(skip)]
    pub headers: HelperHeaders,
}

/// Renders kernel specs with the embedded templates (or replacements of some of them).
pub struct Renderer {
    tera: Tera,
    headers: HelperHeaders,
}

impl Renderer {
    /// A renderer of the embedded templates.
    pub fn new() -> Result<Renderer> {
        Renderer::with_overrides(&[])
    }

    /// A renderer where the templates or helper headers named in `overrides` (file name,
    /// text) replace the embedded ones; used to check that a deliberately broken kernel is
    /// caught. Sources rendered with an overridden header build only in the emulator.
    pub fn with_overrides(overrides: &[(&str, &str)]) -> Result<Renderer> {
        if let Some((name, _)) = overrides
            .iter()
            .find(|(name, _)| !TEMPLATES.iter().chain(&HEADERS).any(|(n, _)| n == name))
        {
            return Err(Error::Codegen {
                kernel: "(templates)".into(),
                reason: format!(
                    "cannot override `{name}`: no template or helper header has that name"
                ),
            });
        }
        let mut tera = Tera::default();
        tera.autoescape_on(vec![]);
        tera.add_raw_templates(overridden(&TEMPLATES, overrides))
            .map_err(|e| Error::Codegen {
                kernel: "(templates)".into(),
                reason: chain(&e),
            })?;
        Ok(Renderer {
            tera,
            headers: HelperHeaders::with_overrides(overrides),
        })
    }

    /// The source of `spec` for `arch`.
    pub fn render(&self, spec: &KernelSpec, arch: Arch) -> Result<KernelSource> {
        let context = KernelContext::new(spec, arch);
        let name = spec.name();
        let err = |reason: String| Error::Codegen {
            kernel: name.clone(),
            reason,
        };
        let ctx = tera::Context::from_serialize(&context).map_err(|e| err(chain(&e)))?;
        let template = format!("{}.cu.tera", spec.template());
        let source = self
            .tera
            .render(&template, &ctx)
            .map_err(|e| err(chain(&e)))?;
        Ok(KernelSource {
            spec: *spec,
            arch,
            file_name: format!("{name}.cu"),
            name,
            source: tidy(&source),
            entry_points: spec.entry_points(),
            context,
            headers: self.headers.clone(),
        })
    }
}

/// The (name, text) pairs of `embedded`, each text replaced by the override of that name.
fn overridden<'a>(
    embedded: &'a [(&'a str, &'a str)],
    overrides: &'a [(&'a str, &'a str)],
) -> impl Iterator<Item = (&'a str, &'a str)> {
    embedded.iter().map(move |&(name, text)| {
        let text = overrides
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(text, |(_, t)| *t);
        (name, text)
    })
}

/// Trailing whitespace removed from every line, exactly one final newline.
fn tidy(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    for line in source.trim_end().lines() {
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A Tera error with its causes (Tera's own message names only the template).
fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        cur = s.source();
    }
    msg
}
