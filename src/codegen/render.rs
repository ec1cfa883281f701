//! Tera rendering of kernel sources. The templates (templates/*.cu.tera) and the helper
//! headers (kernels/*.cuh) are embedded in the binary, so codegen works from any directory;
//! the headers are handed to NVRTC (and written next to the sources by `fpx codegen`) as an
//! include directory. Rendering is a pure function of (spec, arch): no clocks, no paths, no
//! hash-map iteration, so the same inputs give byte-identical sources.

use serde::Serialize;
use tera::Tera;

use super::arch::Arch;
use super::context::KernelContext;
use super::spec::KernelSpec;
use crate::error::{Error, Result};

/// The kernel templates, by file name.
pub const TEMPLATES: [(&str, &str); 9] = [
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
];

/// The hand-written helper headers every kernel includes, by file name.
pub const HEADERS: [(&str, &str); 2] = [
    (
        "fpx_common.cuh",
        include_str!("../../kernels/fpx_common.cuh"),
    ),
    (
        "fpx_formats.cuh",
        include_str!("../../kernels/fpx_formats.cuh"),
    ),
];

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
}

/// Renders kernel specs with the embedded templates (or replacements of some of them).
pub struct Renderer {
    tera: Tera,
}

impl Renderer {
    /// A renderer of the embedded templates.
    pub fn new() -> Result<Renderer> {
        Renderer::with_overrides(&[])
    }

    /// A renderer where the templates named in `overrides` (file name, text) replace the
    /// embedded ones; used to check that a deliberately broken template is caught.
    pub fn with_overrides(overrides: &[(&str, &str)]) -> Result<Renderer> {
        let mut tera = Tera::default();
        tera.autoescape_on(vec![]);
        let templates: Vec<(&str, &str)> = TEMPLATES
            .iter()
            .map(|&(name, text)| {
                let text = overrides
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map_or(text, |(_, t)| *t);
                (name, text)
            })
            .collect();
        tera.add_raw_templates(templates)
            .map_err(|e| Error::Codegen {
                kernel: "(templates)".into(),
                reason: chain(&e),
            })?;
        Ok(Renderer { tera })
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
        let template = format!("{}.cu.tera", spec.family());
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
        })
    }
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
