//! Messages between the supervisor and the inference worker, carried as JSON in
//! [`securerun_sandbox::frame`] frames. The supervisor bounds and checks everything it receives.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use securerun_models::source::{AuxFile, Layout, Origin, SourceParts};
use securerun_models::{ChatMessage, FinishReason, GenerationParams, Limits};

use crate::signing::bundle::{b64_decode, b64_encode};

/// Largest frame the supervisor accepts from the worker (a text piece, a batch of embeddings).
pub const MAX_FROM_WORKER: usize = 8 * 1024 * 1024;
/// Largest frame the worker accepts (the load message carries tokenizer and configuration).
pub const MAX_TO_WORKER: usize = 512 * 1024 * 1024;

fn one() -> usize {
    1
}

/// What the worker serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    Generate,
    Embed,
}

impl From<securerun_models::Task> for Task {
    fn from(task: securerun_models::Task) -> Self {
        match task {
            securerun_models::Task::TextGeneration => Task::Generate,
            securerun_models::Task::Embeddings => Task::Embed,
        }
    }
}

impl From<Task> for securerun_models::Task {
    fn from(task: Task) -> Self {
        match task {
            Task::Generate => securerun_models::Task::TextGeneration,
            Task::Embed => securerun_models::Task::Embeddings,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToWorker {
    /// Load the model whose weight files are the passed descriptors.
    Load {
        task: Task,
        source: PartsMsg,
        limits: Limits,
        /// The precision to keep the weights at.
        precision: securerun_models::Precision,
        /// Generations the worker may run at once (continuous batching).
        #[serde(default = "one")]
        max_sequences: usize,
        /// `max_sequences` is a ceiling the worker may lower until every sequence's KV cache
        /// fits the device's memory; otherwise a device that cannot hold that many refuses.
        #[serde(default)]
        sequences_by_memory: bool,
        /// The most positions a request can use, for the device memory check (`None`: the
        /// model's own limit).
        #[serde(default)]
        context: Option<u64>,
    },
    /// Generate from prompt ids the supervisor tokenized (its counts are the ones enforced).
    Generate {
        id: u64,
        prompt_ids: Vec<u32>,
        params: GenerationParams,
        /// Whose cached prefixes this generation may reuse (a keyed hash of the access token,
        /// never the token itself); none: no reuse.
        #[serde(default)]
        prefix_key: Option<u64>,
    },
    Embed {
        id: u64,
        inputs: Vec<securerun_models::EmbedInput>,
    },
    /// Render chat messages with the model's template (templates come from the model file, so
    /// they run here, confined, not in the supervisor).
    Render {
        id: u64,
        messages: Vec<ChatMessage>,
        /// The tools the model may call (OpenAI's function objects), for the template.
        #[serde(default)]
        tools: Vec<serde_json::Value>,
    },
    /// Stop request `id` (its client went away).
    Cancel { id: u64 },
}

/// Why a request failed in the worker, as far as the client's fix depends on it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureCause {
    /// The request (or the worker's work on it) failed.
    #[default]
    General,
    /// The output grammar (a response format, or the tools) cannot be used.
    Grammar,
    /// The output grammar failed mid-generation (the engine's limit, not the request's fault).
    GrammarStep,
}

impl FailureCause {
    pub fn of(e: &securerun_models::GenerateError) -> Self {
        match e {
            securerun_models::GenerateError::Grammar(
                securerun_models::grammar::GrammarError::Step(_),
            ) => FailureCause::GrammarStep,
            securerun_models::GenerateError::Grammar(_) => FailureCause::Grammar,
            _ => FailureCause::General,
        }
    }

    fn is_general(&self) -> bool {
        *self == FailureCause::General
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromWorker {
    /// Confined; layer by layer what was enforced.
    Confined {
        layers: Vec<LayerMsg>,
    },
    /// The model is loaded; it runs up to `sequences` generations at once (1: one at a time,
    /// a worker that does not say runs one at a time).
    Ready {
        #[serde(default = "one")]
        sequences: usize,
        /// The accelerator the model was loaded on, as the driver names it (none: the CPU).
        /// Shown and recorded, never acted on.
        #[serde(default)]
        device: Option<String>,
    },
    /// `securerun doctor --device`: the device as a confined worker sees it, or why it cannot.
    DeviceCheck {
        described: Option<String>,
        error: Option<String>,
    },
    /// A request (or, with no id, loading) failed.
    Failed {
        id: Option<u64>,
        error: String,
        /// What the request got wrong, where a client needs to know which field.
        #[serde(default, skip_serializing_if = "FailureCause::is_general")]
        cause: FailureCause,
    },
    /// A piece of generated text.
    Text {
        id: u64,
        text: String,
    },
    /// Generation `id` ended.
    Done {
        id: u64,
        finish_reason: FinishReason,
        prompt_tokens: usize,
        /// Prompt tokens taken from a cached prefix (fewer than `prompt_tokens`).
        #[serde(default)]
        cached_tokens: usize,
        token_ids: Vec<u32>,
        prefill_us: u64,
        decode_us: u64,
        /// Per generated token, when the request asked for log-probabilities.
        #[serde(default)]
        logprobs: Vec<securerun_models::TokenLogprob>,
    },
    Embeddings {
        id: u64,
        vectors: Vec<Vec<f32>>,
    },
    /// The rendered chat prompt for request `id`.
    Rendered {
        id: u64,
        text: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerMsg {
    pub name: String,
    pub enforced: bool,
    pub detail: String,
}

/// [`SourceParts`] with byte buffers as base64.
#[derive(Debug, Serialize, Deserialize)]
pub struct PartsMsg {
    path: PathBuf,
    layout: String,
    weight_paths: Vec<PathBuf>,
    index_file: Option<(PathBuf, String)>,
    /// name -> (base64 bytes, file it came from if not embedded)
    aux: BTreeMap<String, (String, Option<PathBuf>)>,
}

impl PartsMsg {
    pub fn from_parts(p: &SourceParts) -> Self {
        PartsMsg {
            path: p.path.clone(),
            layout: match p.layout {
                Layout::Directory => "directory",
                Layout::Sharded => "sharded",
                Layout::SingleFile => "single_file",
            }
            .into(),
            weight_paths: p.weight_paths.clone(),
            index_file: p
                .index_file
                .as_ref()
                .map(|(path, bytes)| (path.clone(), b64_encode(bytes))),
            aux: p
                .aux
                .iter()
                .map(|(name, f)| {
                    let origin = match &f.origin {
                        Origin::Embedded => None,
                        Origin::File(path) => Some(path.clone()),
                    };
                    (name.clone(), (b64_encode(&f.bytes), origin))
                })
                .collect(),
        }
    }

    pub fn into_parts(self) -> Result<SourceParts, String> {
        let decode = |s: &str| b64_decode(s).map_err(|e| format!("bad base64: {e}"));
        let layout = match self.layout.as_str() {
            "directory" => Layout::Directory,
            "sharded" => Layout::Sharded,
            "single_file" => Layout::SingleFile,
            other => return Err(format!("unknown layout {other:?}")),
        };
        let index_file = match self.index_file {
            Some((path, b)) => Some((path, decode(&b)?)),
            None => None,
        };
        let mut aux = BTreeMap::new();
        for (name, (b, origin)) in self.aux {
            let origin = origin.map_or(Origin::Embedded, Origin::File);
            aux.insert(
                name,
                AuxFile {
                    bytes: decode(&b)?,
                    origin,
                },
            );
        }
        Ok(SourceParts {
            path: self.path,
            layout,
            weight_paths: self.weight_paths,
            index_file,
            aux,
        })
    }
}
