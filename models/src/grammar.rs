//! Constrained decoding: the output of a generation made to match a grammar (any JSON object, a
//! JSON schema, or a Lark grammar such as the one tool calls are built into), token by token.
//!
//! The grammar engine is llguidance (the one llama.cpp and vLLM use). At each step it computes
//! which tokens keep the output a prefix of something the grammar accepts; the sampler only
//! chooses among those, and end-of-sequence is allowed only where the output is complete. So a
//! constrained output always parses, unless the token budget ends it first (`length`).
//!
//! Everything here is bounded, since a schema is a client's input: its size and nesting
//! ([`OutputGrammar::check`]), the size of the grammar it compiles to, the work compiling it, and
//! the work per token (llguidance's fuel and item limits, [`limits`]: a few milliseconds at
//! most, not a wall clock, so the same request always gets the same tokens).

use std::sync::Arc;

use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::toktrie::{ApproximateTokEnv, SimpleVob, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde::{Deserialize, Serialize};

/// The largest schema or grammar text accepted, in bytes.
pub const MAX_GRAMMAR_BYTES: usize = 64 * 1024;

/// The deepest nesting of arrays and objects a JSON schema may have.
pub const MAX_SCHEMA_DEPTH: usize = 32;

/// What a generation's output must match.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OutputGrammar {
    /// Any JSON object.
    JsonObject,
    /// JSON valid against a JSON schema (its JSON text: the worker protocol carries text).
    JsonSchema { schema: String },
    /// A grammar in llguidance's Lark syntax (what tool calls compile to).
    Lark { grammar: String },
}

/// Why a grammar cannot constrain a generation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrammarError {
    #[error("the schema is {0} bytes; at most {MAX_GRAMMAR_BYTES} are accepted")]
    TooLarge(usize),
    #[error("the schema nests deeper than {MAX_SCHEMA_DEPTH} levels")]
    TooDeep,
    #[error("the schema is not valid JSON: {0}")]
    NotJson(String),
    /// The schema or grammar is refused by the engine (unsupported keyword, unsatisfiable,
    /// over the engine's size limits).
    #[error("the schema cannot be used: {0}")]
    Invalid(String),
    /// This model's tokenizer cannot be described to the engine (not byte-level or byte
    /// fallback BPE).
    #[error("constrained output is not available for this model's tokenizer: {0}")]
    Tokenizer(String),
    /// The engine failed mid-generation (its per-token work limit, or an internal error).
    #[error("the output grammar failed: {0}")]
    Step(String),
}

impl OutputGrammar {
    /// Checks size and nesting, before anything compiles it.
    pub fn check(&self) -> Result<(), GrammarError> {
        match self {
            OutputGrammar::JsonObject => Ok(()),
            OutputGrammar::JsonSchema { schema } => {
                if schema.len() > MAX_GRAMMAR_BYTES {
                    return Err(GrammarError::TooLarge(schema.len()));
                }
                let value: serde_json::Value = serde_json::from_str(schema)
                    .map_err(|e| GrammarError::NotJson(e.to_string()))?;
                check_depth(&value)
            }
            OutputGrammar::Lark { grammar } => match grammar.len() > MAX_GRAMMAR_BYTES {
                true => Err(GrammarError::TooLarge(grammar.len())),
                false => Ok(()),
            },
        }
    }

    /// The engine's form: JSON is written compactly (`, ` and `: `, no free whitespace), so a
    /// small model cannot pad its output with blanks until the budget runs out.
    fn top_level(&self) -> Result<TopLevelGrammar, GrammarError> {
        let schema = match self {
            OutputGrammar::Lark { grammar } => {
                return Ok(TopLevelGrammar::from_lark(grammar.clone()))
            }
            OutputGrammar::JsonObject => serde_json::json!({"type": "object"}),
            OutputGrammar::JsonSchema { schema } => {
                serde_json::from_str(schema).map_err(|e| GrammarError::NotJson(e.to_string()))?
            }
        };
        Ok(TopLevelGrammar::from_json_schema(compact(schema)?))
    }
}

/// Sets llguidance's JSON options on a schema (replacing any the client sent).
fn compact(mut schema: serde_json::Value) -> Result<serde_json::Value, GrammarError> {
    let options = serde_json::json!({
        "whitespace_flexible": false,
        "item_separator": ", ",
        "key_separator": ": ",
    });
    match &mut schema {
        serde_json::Value::Object(map) => {
            map.insert("x-guidance".into(), options);
            Ok(schema)
        }
        // `true` accepts any JSON value; `false` nothing.
        serde_json::Value::Bool(true) => Ok(serde_json::json!({"x-guidance": options})),
        _ => Err(GrammarError::Invalid(
            "a JSON schema is an object (or true)".into(),
        )),
    }
}

/// Fails when arrays and objects nest deeper than [`MAX_SCHEMA_DEPTH`] (iteratively: a deep
/// value cannot overflow this check's stack).
pub fn check_depth(value: &serde_json::Value) -> Result<(), GrammarError> {
    let mut stack = vec![(value, 1usize)];
    while let Some((v, depth)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &serde_json::Value>> = match v {
            serde_json::Value::Array(a) => Box::new(a.iter()),
            serde_json::Value::Object(m) => Box::new(m.values()),
            _ => continue,
        };
        if depth > MAX_SCHEMA_DEPTH {
            return Err(GrammarError::TooDeep);
        }
        stack.extend(children.map(|c| (c, depth + 1)));
    }
    Ok(())
}

fn too_complex() -> GrammarError {
    GrammarError::Invalid("the schema is too complex for the grammar engine".into())
}

/// The engine's message for a schema it refuses, for the client: its first line, bounded. The
/// engine reports its own caught assertions as errors too (`panic: ...` and a backtrace): those
/// say nothing a client can act on and are replaced.
fn engine_error(message: &str) -> GrammarError {
    let first = message.lines().next().unwrap_or_default();
    if first.starts_with("panic") {
        return too_complex();
    }
    let mut end = first.len().min(300);
    while !first.is_char_boundary(end) {
        end -= 1;
    }
    GrammarError::Invalid(first[..end].to_string())
}

/// The engine's limits for one grammar: its size and the work of compiling it and of each
/// token's mask (llguidance's own measures; its documentation rates lexer fuel at ~14k/ms and
/// Earley items at ~20k/ms, so a step costs a few milliseconds at most).
fn limits() -> ParserLimits {
    ParserLimits {
        max_items_in_row: 2_000,
        initial_lexer_fuel: 1_000_000,
        step_lexer_fuel: 100_000,
        step_max_items: 50_000,
        // ~1–2 kB each: this bounds the lexer's memory to tens of megabytes.
        max_lexer_states: 20_000,
        max_grammar_size: 200_000,
        precompute_large_lexemes: true,
        // Errors never carry the output so far (it is a prompt's answer; errors reach logs).
        verbose_errors: false,
    }
}

/// A model's tokenizer, as the grammar engine sees it: the bytes of every token.
pub struct GrammarEnv {
    factory: ParserFactory,
}

impl std::fmt::Debug for GrammarEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarEnv").finish_non_exhaustive()
    }
}

impl GrammarEnv {
    /// Describes the tokenizer in `tokenizer_json` to the engine, for a model whose logits have
    /// `vocab` entries (often more than the tokenizer's: padding) and whose generation ends at
    /// any of `eos`.
    pub fn new(tokenizer_json: &[u8], vocab: usize, eos: &[u32]) -> Result<Self, GrammarError> {
        let json: serde_json::Value = serde_json::from_slice(tokenizer_json)
            .map_err(|e| GrammarError::Tokenizer(e.to_string()))?;
        // llguidance's reader asserts on some malformed vocabularies: a model file's content,
        // so a panic there is this model's error, not the worker's end.
        let words =
            crate::panic_guard::catch(|| llguidance::token_bytes_from_tokenizer_json(&json))
                .map_err(GrammarError::Tokenizer)?
                .map_err(|e| GrammarError::Tokenizer(e.to_string()))?;
        let vocab = vocab.max(words.len());
        let mut words = words;
        words.resize(vocab, Vec::new());
        let &first_eos = eos.first().ok_or_else(|| {
            GrammarError::Tokenizer("the model has no end-of-sequence token".into())
        })?;
        let trie = crate::panic_guard::catch(|| {
            TokTrie::from(&TokRxInfo::new(vocab as u32, first_eos), &words).with_eos_tokens(eos)
        })
        .map_err(GrammarError::Tokenizer)?;
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory =
            ParserFactory::new_simple(&env).map_err(|e| GrammarError::Tokenizer(e.to_string()))?;
        factory.quiet();
        *factory.limits_mut() = limits();
        Ok(GrammarEnv { factory })
    }

    /// Compiles `grammar` for one generation.
    pub fn constraint(&self, grammar: &OutputGrammar) -> Result<Constraint, GrammarError> {
        grammar.check()?;
        let top = grammar.top_level()?;
        // An engine assertion on a hostile schema is this request's error; its text (a panic
        // message and backtrace) is not the client's business.
        let parser = crate::panic_guard::catch(|| self.factory.create_parser(top))
            .map_err(|_| too_complex())?
            .map_err(|e| engine_error(&e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(engine_error(&e));
        }
        Ok(Constraint { matcher })
    }
}

/// A failure mid-generation, first line only (never the engine's backtrace or state).
fn step_error(e: impl std::fmt::Display) -> GrammarError {
    match engine_error(&e.to_string()) {
        GrammarError::Invalid(m) => GrammarError::Step(m),
        other => other,
    }
}

/// One generation's grammar state.
pub struct Constraint {
    matcher: Matcher,
}

impl Constraint {
    /// The tokens allowed next (end-of-sequence among them only where the output may end).
    pub(crate) fn allowed(&mut self) -> Result<SimpleVob, GrammarError> {
        self.matcher.compute_mask().map_err(step_error)
    }

    /// Advances past `token` (one the mask allowed).
    pub(crate) fn consume(&mut self, token: u32) -> Result<(), GrammarError> {
        self.matcher.consume_token(token).map_err(step_error)
    }

    /// Whether the grammar admits no further token: the output is complete.
    pub(crate) fn is_complete(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// Sets every logit the grammar forbids (and any past the engine's vocabulary) to −∞.
    pub(crate) fn mask(&mut self, logits: &mut [f32]) -> Result<(), GrammarError> {
        let allowed = self.allowed()?;
        for (id, logit) in logits.iter_mut().enumerate() {
            if id >= allowed.len() || !allowed.is_allowed(id as u32) {
                *logit = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_and_nesting_are_checked_before_compiling() {
        let deep = format!(
            "{}{{}}{}",
            "{\"items\":".repeat(MAX_SCHEMA_DEPTH + 1),
            "}".repeat(MAX_SCHEMA_DEPTH + 1)
        );
        assert_eq!(
            OutputGrammar::JsonSchema { schema: deep }.check(),
            Err(GrammarError::TooDeep)
        );
        let big = format!("{{\"description\": \"{}\"}}", "x".repeat(MAX_GRAMMAR_BYTES));
        assert!(matches!(
            OutputGrammar::JsonSchema { schema: big }.check(),
            Err(GrammarError::TooLarge(_))
        ));
        assert!(matches!(
            OutputGrammar::JsonSchema { schema: "{".into() }.check(),
            Err(GrammarError::NotJson(_))
        ));
        let fine =
            r#"{"type":"object","properties":{"a":{"type":"array","items":{"type":"integer"}}}}"#;
        assert_eq!(
            OutputGrammar::JsonSchema {
                schema: fine.into()
            }
            .check(),
            Ok(())
        );
    }
}
