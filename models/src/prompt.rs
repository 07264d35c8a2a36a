//! Turning requests into token ids without loading a single weight.
//!
//! A supervisor uses this to count and bound what a client asks for (prompt length, token
//! budgets, usage) before the model sees it, so that the numbers it enforces and records are its
//! own and never a worker's claim. [`crate::TextModel`] uses the same code, so both agree on
//! every id.

use std::sync::Arc;

use tokenizers::Tokenizer;

use crate::chat::{ChatError, ChatTemplate};
use crate::generate::{GenerateError, Prompt};
use crate::load::LoadError;
use crate::source::ModelSource;
use crate::tokenizer::{self, TokenizerError};

/// A model's tokenizer and chat template.
pub struct PromptEncoder {
    tokenizer: Tokenizer,
    chat: Result<ChatTemplate, Arc<ChatError>>,
}

impl PromptEncoder {
    /// Loads `tokenizer.json` only: a supervisor counts tokens but never runs the model's chat
    /// template (code from the model file), which the confined worker renders
    /// ([`Self::rendered_ids`] tokenizes the result). Chat prompts given to this encoder
    /// directly are refused.
    pub fn load(source: &ModelSource) -> Result<Self, LoadError> {
        // The configuration comes first, as for the model itself, so a model that cannot load
        // is refused for the same reason here.
        crate::load::config(source)?;
        let bytes = source
            .aux("tokenizer.json")
            .ok_or(TokenizerError::Missing)?;
        Ok(PromptEncoder {
            tokenizer: tokenizer::load(bytes)?,
            chat: Err(Arc::new(ChatError::Template(
                "chat templates are rendered by the model worker, not here".into(),
            ))),
        })
    }

    /// The tokenizer and the model's chat template (for a process that runs the model).
    pub(crate) fn new(tokenizer: Tokenizer, source: &ModelSource) -> Self {
        let chat = match source.aux("tokenizer_config.json") {
            Some(bytes) => ChatTemplate::from_tokenizer_config(bytes),
            None => Err(ChatError::NoTemplate),
        }
        .map_err(Arc::new);
        PromptEncoder { tokenizer, chat }
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Renders chat messages to the exact prompt text the model sees.
    pub fn render_chat(&self, messages: &[crate::ChatMessage]) -> Result<String, GenerateError> {
        match &self.chat {
            Ok(t) => Ok(t.render(messages, true)?),
            Err(e) => Err(GenerateError::Chat(e.as_ref().clone())),
        }
    }

    /// Tokenizes a prompt the way transformers does: raw text with the tokenizer's special
    /// tokens, chat text without (the template already contains them).
    pub fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<u32>, GenerateError> {
        let ids = match prompt {
            Prompt::Text(text) => tokenizer::encode(&self.tokenizer, text, true)?,
            Prompt::Chat(messages) => {
                tokenizer::encode(&self.tokenizer, &self.render_chat(messages)?, false)?
            }
        };
        if ids.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        Ok(ids)
    }

    /// Tokenizes a chat prompt already rendered with the template (by whoever ran it).
    pub fn rendered_ids(&self, rendered: &str) -> Result<Vec<u32>, GenerateError> {
        let ids = tokenizer::encode(&self.tokenizer, rendered, false)?;
        if ids.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        Ok(ids)
    }

    /// Token count of each text with the tokenizer's special tokens (embedding inputs).
    pub fn count(&self, texts: &[String]) -> Result<Vec<usize>, TokenizerError> {
        texts
            .iter()
            .map(|t| tokenizer::encode(&self.tokenizer, t, true).map(|ids| ids.len()))
            .collect()
    }
}
