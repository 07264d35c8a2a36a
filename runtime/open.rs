//! Opening models: the one path by which the CLI and library users get a runnable model, so
//! every check (header validation now; signature verification and confinement in later layers)
//! applies to both.

use std::path::Path;
use std::sync::Arc;

use securerun_models::{
    EmbedError, Embedder, GenerateError, Limits, LoadError, LoadOptions, ModelSource, SourceError,
    TextModel,
};

/// How to open a model.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Safetensors header limits.
    pub limits: Limits,
    /// Run a model without a valid signature. Signature verification is not implemented yet,
    /// so this currently changes nothing; it is accepted so scripts can already pass it.
    pub allow_unsigned: bool,
}

/// Any error from opening or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Generate(#[from] GenerateError),
    #[error(transparent)]
    Embed(#[from] EmbedError),
}

/// Resolves and validates a model directory or single file.
pub fn open_source(path: &Path, opts: &OpenOptions) -> Result<Arc<ModelSource>, Error> {
    Ok(Arc::new(ModelSource::open(path, &opts.limits)?))
}

fn load_options(opts: &OpenOptions) -> LoadOptions {
    LoadOptions {
        limits: opts.limits,
        ..LoadOptions::default()
    }
}

/// Opens a text-generation model.
pub fn open_text_model(path: &Path, opts: &OpenOptions) -> Result<TextModel, Error> {
    let source = open_source(path, opts)?;
    Ok(TextModel::load(&source, &load_options(opts))?)
}

/// Opens a sentence-embedding model.
pub fn open_embedder(path: &Path, opts: &OpenOptions) -> Result<Embedder, Error> {
    let source = open_source(path, opts)?;
    Ok(Embedder::load(&source, &load_options(opts))?)
}
