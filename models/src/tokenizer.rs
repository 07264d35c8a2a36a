//! Loading a Hugging Face `tokenizer.json` for inference.

use tokenizers::Tokenizer;

/// Why the tokenizer could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("the model has no tokenizer.json (neither embedded nor beside the weights)")]
    Missing,
    #[error("tokenizer.json is invalid: {0}")]
    Invalid(String),
    #[error("tokenization failed: {0}")]
    Encode(String),
    #[error("detokenization failed: {0}")]
    Decode(String),
}

/// Parses `tokenizer.json` bytes. Truncation and padding baked into the file are switched off:
/// a silently truncated prompt is a wrong answer, and padding is the caller's business.
pub fn load(bytes: &[u8]) -> Result<Tokenizer, TokenizerError> {
    // The tokenizers crate panics on some malformed files (e.g. a bad `decoder` section): a
    // model file must never take the process down.
    let mut tok = crate::panic_guard::catch(|| Tokenizer::from_bytes(bytes))
        .map_err(|panic| {
            TokenizerError::Invalid(format!("the tokenizers crate panicked: {panic}"))
        })?
        .map_err(|e| TokenizerError::Invalid(e.to_string()))?;
    tok.with_padding(None);
    tok.with_truncation(None)
        .map_err(|e| TokenizerError::Invalid(e.to_string()))?;
    Ok(tok)
}

/// Encodes `text` to ids.
pub fn encode(tok: &Tokenizer, text: &str, add_special: bool) -> Result<Vec<u32>, TokenizerError> {
    crate::panic_guard::catch(|| tok.encode(text, add_special))
        .map_err(|panic| TokenizerError::Encode(format!("the tokenizers crate panicked: {panic}")))?
        .map(|e| e.get_ids().to_vec())
        .map_err(|e| TokenizerError::Encode(e.to_string()))
}

/// Decodes ids to text, skipping special tokens.
pub fn decode(tok: &Tokenizer, ids: &[u32]) -> Result<String, TokenizerError> {
    tok.decode(ids, true)
        .map_err(|e| TokenizerError::Decode(e.to_string()))
}
