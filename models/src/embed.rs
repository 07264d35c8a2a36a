//! Sentence embeddings.

use std::sync::Arc;

use tokenizers::Tokenizer;

use crate::arch::{ArchError, Architecture, BertEncoder, Pooling, Task};
use crate::load::{self, LoadError, LoadOptions};
use crate::source::{ModelSource, StModule};
use crate::tokenizer::{self, TokenizerError};

/// Why embedding failed.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("input {index} has {tokens} tokens; the model accepts at most {max}")]
    InputTooLong {
        index: usize,
        tokens: usize,
        max: usize,
    },
    #[error("model computation failed: {0}")]
    Compute(String),
    #[error("input {index} holds token id {id}, outside the model's vocabulary of {vocab}")]
    UnknownToken { index: usize, id: u32, vocab: usize },
    #[error("input {index} is empty")]
    EmptyInput { index: usize },
}

/// One input to embed: a text, or token ids a client tokenized itself (taken as they are, with
/// no special tokens added).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EmbedInput {
    Text(String),
    Ids(Vec<u32>),
}

/// A loaded sentence-embedding model.
pub struct Embedder {
    encoder: BertEncoder,
    tokenizer: Tokenizer,
}

#[derive(serde::Deserialize)]
struct StConfig {
    max_seq_length: Option<usize>,
}

impl Embedder {
    /// Builds the encoder; pooling and normalization follow the sentence-transformers config
    /// (`modules.json`, the pooling config, `sentence_bert_config.json`); without one, mean
    /// pooling and L2 normalization.
    pub fn load(source: &Arc<ModelSource>, opts: &LoadOptions) -> Result<Self, LoadError> {
        let parts = load::common(source, opts)?;
        if parts.arch.task() != Task::Embeddings {
            return Err(ArchError::WrongTask {
                arch: parts.arch.name(),
                task: "text-generation",
                wanted: "embeddings",
            }
            .into());
        }
        debug_assert_eq!(parts.arch, Architecture::Bert);
        let (pooling, normalize) = match source.aux_json::<Vec<StModule>>("modules.json")? {
            None => (Pooling::Mean, true),
            Some(modules) => {
                let normalize = modules
                    .iter()
                    .any(|m| m.kind == "sentence_transformers.models.Normalize");
                let pooling = match source.pooling_config_name()? {
                    Some(name) => match source.aux_json::<serde_json::Value>(&name)? {
                        Some(cfg) => Pooling::from_config(&cfg)?,
                        None => Pooling::Mean,
                    },
                    None => Pooling::Mean,
                };
                (pooling, normalize)
            }
        };
        let max_seq = source
            .aux_json::<StConfig>("sentence_bert_config.json")?
            .and_then(|c| c.max_seq_length);
        let own_encoder = opts.engine == load::Engine::Best && opts.device.is_cpu();
        // The own encoder holds any precision the kernels do; candle's only float ones.
        if !own_encoder
            && opts.precision != crate::Precision::Auto
            && opts.precision.candle_dtype().is_none()
        {
            return Err(crate::arch::ArchError::Precision {
                arch: parts.arch.name(),
                precision: opts.precision,
            }
            .into());
        }
        let own = if own_encoder {
            BertEncoder::load_own(
                &parts.config,
                source,
                opts.precision,
                pooling,
                normalize,
                max_seq,
            )?
        } else {
            None
        };
        let encoder = match own {
            Some(e) => e,
            None => {
                let vb = crate::weights::var_builder(source.clone(), parts.dtype, &opts.device);
                BertEncoder::load(&parts.config, vb, pooling, normalize, max_seq)?
            }
        };
        Ok(Embedder {
            encoder,
            tokenizer: parts.tokenizer,
        })
    }

    /// Embedding dimension.
    pub fn dimension(&self) -> usize {
        self.encoder.dimension()
    }

    /// Longest accepted input, in tokens.
    pub fn max_tokens(&self) -> usize {
        self.encoder.max_tokens()
    }

    /// Token count of each input (with special tokens), for usage accounting.
    pub fn tokenize(&self, texts: &[String]) -> Result<Vec<Vec<u32>>, EmbedError> {
        texts
            .iter()
            .enumerate()
            .map(|(index, t)| self.tokenize_one(index, t))
            .collect()
    }

    /// Input `index`'s tokens, within the model's length.
    fn tokenize_one(&self, index: usize, text: &str) -> Result<Vec<u32>, EmbedError> {
        let max = self.encoder.max_tokens();
        let ids = tokenizer::encode(&self.tokenizer, text, true)?;
        if ids.len() > max {
            return Err(EmbedError::InputTooLong {
                index,
                tokens: ids.len(),
                max,
            });
        }
        Ok(ids)
    }

    /// Embeds texts and token-id inputs alike; one vector per input, in order. Ids are checked
    /// against the vocabulary and the model's length, as a text's tokens are.
    pub fn embed_inputs(&self, inputs: &[EmbedInput]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let max = self.encoder.max_tokens();
        let vocab = self.tokenizer.get_vocab_size(true);
        let ids = inputs
            .iter()
            .enumerate()
            .map(|(index, input)| match input {
                EmbedInput::Text(t) => self.tokenize_one(index, t),
                EmbedInput::Ids(ids) => {
                    if ids.is_empty() {
                        return Err(EmbedError::EmptyInput { index });
                    }
                    if ids.len() > max {
                        return Err(EmbedError::InputTooLong {
                            index,
                            tokens: ids.len(),
                            max,
                        });
                    }
                    match ids.iter().find(|&&id| id as usize >= vocab) {
                        Some(&id) => Err(EmbedError::UnknownToken { index, id, vocab }),
                        None => Ok(ids.clone()),
                    }
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.embed_ids(&ids)
    }

    /// Embeds each text; one vector per input, in order.
    pub fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let ids = self.tokenize(texts)?;
        self.embed_ids(&ids)
    }

    /// Embeds already tokenized inputs (see [`Self::tokenize`]).
    pub fn embed_ids(&self, ids: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(self.encoder.batch_size()) {
            let vectors = match crate::panic_guard::catch(|| self.encoder.encode(chunk)) {
                Ok(result) => result.map_err(|e| EmbedError::Compute(e.to_string()))?,
                Err(panic) => {
                    return Err(EmbedError::Compute(format!("model code panicked: {panic}")))
                }
            };
            out.extend(vectors);
        }
        Ok(out)
    }
}
