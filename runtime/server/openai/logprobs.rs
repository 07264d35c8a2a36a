//! Log-probabilities in OpenAI's two shapes: chat's `logprobs.content` (token, logprob, bytes,
//! top_logprobs) and legacy completions' parallel arrays (tokens, token_logprobs,
//! top_logprobs, text_offset).

use serde_json::{json, Map, Value};

use securerun_models::{PromptEncoder, TokenLogprob};

/// A token's text as it decodes alone (a piece of a multi-byte character shows as U+FFFD; its
/// `bytes` are those of that text).
fn token_text(encoder: &PromptEncoder, id: u32) -> String {
    encoder.tokenizer().decode(&[id], false).unwrap_or_default()
}

/// Chat's `logprobs` object.
pub(super) fn chat(encoder: &PromptEncoder, entries: &[TokenLogprob]) -> Value {
    let entry = |id: u32, logprob: f32| {
        let text = token_text(encoder, id);
        json!({"token": text, "logprob": logprob, "bytes": text.as_bytes()})
    };
    let content: Vec<Value> = entries
        .iter()
        .map(|e| {
            let mut v = entry(e.id, e.logprob);
            v["top_logprobs"] = e.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
            v
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// Completions' `logprobs` object; offsets count from `start` (bytes of text before).
pub(super) fn completion(encoder: &PromptEncoder, entries: &[TokenLogprob], start: usize) -> Value {
    let mut offset = start;
    let (mut tokens, mut lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
    for e in entries {
        let text = token_text(encoder, e.id);
        offsets.push(offset);
        offset += text.len();
        tokens.push(text);
        lps.push(e.logprob);
        let top: Map<String, Value> = e
            .top
            .iter()
            .map(|&(id, lp)| (token_text(encoder, id), json!(lp)))
            .collect();
        tops.push(Value::Object(top));
    }
    json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}
