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
    /// The same tokenizer with its special tokens treated as text: for what a message says.
    text_tokenizer: Tokenizer,
    /// The special tokens' texts, to find in a message in one linear pass (`None`: none).
    specials: Option<aho_corasick::AhoCorasick>,
    chat: Result<ChatTemplate, Arc<ChatError>>,
}

/// How chat messages become token ids so that what a message says stays text: a message
/// whose content spells one of the tokenizer's special tokens (`<|im_end|>`, `<|im_start|>`)
/// must not end its turn or open another one. Only the template places control tokens.
///
/// When no content spells a special token, the messages are rendered as they are and the
/// result tokenized whole (exactly as transformers does). Otherwise each content is replaced
/// by a marker of this request's own for rendering, the rendered text is cut at the markers,
/// and each content is tokenized with special tokens as plain text between the template's
/// pieces. A template that drops, repeats or rewrites a content (so a marker is not found
/// exactly once, in order) is refused rather than guessed at.
#[derive(Debug, Clone, Default)]
pub struct ChatPlan {
    /// The contents and their markers, when markers stand in for them.
    contents: Option<Vec<(String, String)>>,
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
        Ok(Self::with_chat(
            tokenizer::load(bytes)?,
            Err(Arc::new(ChatError::Template(
                "chat templates are rendered by the model worker, not here".into(),
            ))),
        ))
    }

    /// The tokenizer and the model's chat template (for a process that runs the model).
    pub(crate) fn new(tokenizer: Tokenizer, source: &ModelSource) -> Self {
        let chat = match source.aux("tokenizer_config.json") {
            Some(bytes) => ChatTemplate::from_tokenizer_config(bytes),
            None => Err(ChatError::NoTemplate),
        }
        .map_err(Arc::new);
        Self::with_chat(tokenizer, chat)
    }

    fn with_chat(tokenizer: Tokenizer, chat: Result<ChatTemplate, Arc<ChatError>>) -> Self {
        let mut text_tokenizer = tokenizer.clone();
        text_tokenizer.set_encode_special_tokens(true);
        let texts: Vec<String> = tokenizer
            .get_added_tokens_decoder()
            .values()
            .filter(|t| t.special && !t.content.is_empty())
            .map(|t| t.content.clone())
            .collect();
        // A tokenizer's own token list: if the automaton cannot be built, every message takes
        // the marker path (safe, only slower).
        let specials = aho_corasick::AhoCorasick::new(&texts).ok();
        PromptEncoder {
            tokenizer,
            text_tokenizer,
            specials,
            chat,
        }
    }

    /// Whether `text` spells any special token (linear in `text`).
    fn spells_special_token(&self, text: &str) -> bool {
        match &self.specials {
            Some(ac) => ac.is_match(text),
            None => true,
        }
    }

    /// What to render for `messages` (the messages themselves, moved, unless a content spells
    /// a special token), and how the rendered text becomes ids ([`ChatPlan`]).
    pub fn chat_plan(
        &self,
        messages: Vec<crate::ChatMessage>,
    ) -> (Vec<crate::ChatMessage>, ChatPlan) {
        if !messages
            .iter()
            .any(|m| self.spells_special_token(&m.content))
        {
            return (messages, ChatPlan::default());
        }
        let nonce = {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_usize(messages.len());
            h.finish()
        };
        let mut rendered = Vec::with_capacity(messages.len());
        let mut contents = Vec::with_capacity(messages.len());
        for (i, mut m) in messages.into_iter().enumerate() {
            // Private-use characters around a per-request number: no template writes them, and
            // no client can predict them.
            let marker = format!("\u{e000}{nonce:016x}.{i}\u{e001}");
            let content = std::mem::replace(&mut m.content, marker.clone());
            rendered.push(m);
            contents.push((marker, content));
        }
        (
            rendered,
            ChatPlan {
                contents: Some(contents),
            },
        )
    }

    /// The ids of a chat prompt: `rendered` is what [`Self::chat_plan`] said to render,
    /// rendered with the model's template (by whoever ran it).
    pub fn chat_ids(&self, plan: &ChatPlan, rendered: &str) -> Result<Vec<u32>, GenerateError> {
        let Some(contents) = &plan.contents else {
            return self.rendered_ids(rendered);
        };
        let mut ids = Vec::new();
        let mut rest = rendered;
        for (marker, content) in contents {
            let Some((before, after)) = rest.split_once(marker.as_str()) else {
                return Err(GenerateError::ContentNotKept);
            };
            ids.extend(tokenizer::encode(&self.tokenizer, before, false)?);
            ids.extend(tokenizer::encode(&self.text_tokenizer, content, false)?);
            rest = after;
        }
        if contents
            .iter()
            .any(|(marker, _)| rest.contains(marker.as_str()))
        {
            return Err(GenerateError::ContentNotKept);
        }
        ids.extend(tokenizer::encode(&self.tokenizer, rest, false)?);
        if ids.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        Ok(ids)
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Token ids run from 0 to this (added tokens included).
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Renders chat messages to the exact prompt text the model sees.
    pub fn render_chat(&self, messages: &[crate::ChatMessage]) -> Result<String, GenerateError> {
        self.render_chat_with_tools(messages, &[])
    }

    /// [`Self::render_chat`] with the tools the model may call ([`ChatTemplate::render_with_tools`]).
    pub fn render_chat_with_tools(
        &self,
        messages: &[crate::ChatMessage],
        tools: &[serde_json::Value],
    ) -> Result<String, GenerateError> {
        match &self.chat {
            Ok(t) => Ok(t.render_with_tools(messages, tools, true)?),
            Err(e) => Err(GenerateError::Chat(e.as_ref().clone())),
        }
    }

    /// Whether `text` spells one of the tokenizer's control tokens (a client's text that the
    /// template renders outside a message's content, such as a tool's description, must not).
    pub fn spells_control_token(&self, text: &str) -> bool {
        self.spells_special_token(text)
    }

    /// Tokenizes a prompt the way transformers does: raw text with the tokenizer's special
    /// tokens, chat text without (the template already contains them).
    pub fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<u32>, GenerateError> {
        let ids = match prompt {
            Prompt::Text(text) => tokenizer::encode(&self.tokenizer, text, true)?,
            Prompt::Chat(messages) => {
                let (to_render, plan) = self.chat_plan(messages.clone());
                return self.chat_ids(&plan, &self.render_chat(&to_render)?);
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
