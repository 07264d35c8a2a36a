//! Incremental detokenization that never emits broken UTF-8.
//!
//! Byte-level BPE splits multi-byte characters across tokens, and SentencePiece-style decoders
//! drop the leading space of the first token of a slice. So each step decodes a window that starts
//! a few tokens back (`prefix`) twice, with and without the newest tokens, and emits the
//! difference only once it no longer ends in an incomplete character (U+FFFD).

use tokenizers::Tokenizer;

use crate::tokenizer::{decode, TokenizerError};

/// Turns a stream of token ids into a stream of complete text pieces.
#[derive(Debug, Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl Detokenizer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one token; returns the text it completes, if any.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>, TokenizerError> {
        self.ids.push(id);
        let before = decode(tok, &self.ids[self.prefix..self.read])?;
        let now = decode(tok, &self.ids[self.prefix..])?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') && now.starts_with(&before) {
            let piece = now[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(Some(piece))
        } else {
            Ok(None)
        }
    }

    /// Text still held back (an incomplete character at the very end), for the end of a stream.
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<Option<String>, TokenizerError> {
        let before = decode(tok, &self.ids[self.prefix..self.read])?;
        let now = decode(tok, &self.ids[self.prefix..])?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        match now.strip_prefix(&before) {
            Some(rest) if !rest.is_empty() => Ok(Some(rest.to_string())),
            _ => Ok(None),
        }
    }
}
