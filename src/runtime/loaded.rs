//! The kernels a backend has loaded: per entry point its function (a CUDA function, an
//! emulator symbol), per kernel its template context, and the one lookup both the cuda and
//! the emu backend launch through (function + launch dimensions of a spec for a pass).

use std::collections::BTreeMap;

use crate::codegen::{KernelContext, KernelSource, Launch};
use crate::error::{Error, Result};
use crate::lower::KernelSpec;

/// Loaded entry points of type `F` and the contexts their launches are computed from.
pub struct LoadedKernels<F> {
    functions: BTreeMap<String, F>,
    contexts: BTreeMap<String, KernelContext>,
}

impl<F> Default for LoadedKernels<F> {
    fn default() -> Self {
        LoadedKernels {
            functions: BTreeMap::new(),
            contexts: BTreeMap::new(),
        }
    }
}

impl<F> LoadedKernels<F> {
    /// Whether kernel `name` (a spec's name) is loaded.
    pub fn has(&self, name: &str) -> bool {
        self.contexts.contains_key(name)
    }

    /// Adds `src`'s entry points, `load(entry)` giving each one's function.
    pub fn add(
        &mut self,
        src: &KernelSource,
        mut load: impl FnMut(&str) -> Result<F>,
    ) -> Result<()> {
        for entry in &src.entry_points {
            self.functions.insert(entry.clone(), load(entry)?);
        }
        self.contexts.insert(src.name.clone(), src.context.clone());
        Ok(())
    }

    /// The context of kernel `spec`, if loaded.
    pub fn context(&self, spec: &KernelSpec) -> Option<&KernelContext> {
        self.contexts.get(&spec.name())
    }

    /// The function of `entry` alone (hand-written kernels launched with explicit dimensions).
    pub fn function(&self, entry: &str) -> Result<&F> {
        self.functions.get(entry).ok_or_else(|| not_loaded(entry))
    }

    /// Entry `entry` of `spec` and its launch for `rows` rows over `context` KV positions.
    pub fn get(
        &self,
        spec: &KernelSpec,
        entry: &str,
        rows: usize,
        context: usize,
    ) -> Result<(&F, Launch)> {
        let f = self.function(entry)?;
        let launch = self
            .context(spec)
            .ok_or_else(|| not_loaded(entry))?
            .launch(rows, context);
        Ok((f, launch))
    }

    /// Drops every function (before the library that holds them is unloaded).
    pub fn clear(&mut self) {
        self.functions.clear();
    }
}

fn not_loaded(entry: &str) -> Error {
    Error::Codegen {
        kernel: entry.to_string(),
        reason: "kernel not loaded".into(),
    }
}
