//! Request bodies as clients send them, and the generation settings they ask for.

use serde::Deserialize;
use serde_json::Value;

use securerun_models::grammar::OutputGrammar;
use securerun_models::tools::{FunctionCall, ToolCall};
use securerun_models::EmbedInput;
use securerun_models::{ChatMessage, FinishReason, GenerationParams, SamplingParams};

use super::error::ApiError;
use crate::server::AppState;

/// `stop` may be a string or a list.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StreamOptions {
    #[serde(default)]
    pub(super) include_usage: bool,
}

/// Fields shared by chat and text completions (which fields each route takes at all is
/// [`crate::server::fields`]' business).
#[derive(Deserialize)]
pub(super) struct Sampling {
    pub(super) model: String,
    #[serde(default)]
    pub(super) max_tokens: Option<u32>,
    #[serde(default)]
    pub(super) max_completion_tokens: Option<u32>,
    #[serde(default)]
    pub(super) temperature: Option<f64>,
    #[serde(default)]
    pub(super) top_p: Option<f64>,
    #[serde(default)]
    pub(super) seed: Option<u64>,
    #[serde(default)]
    pub(super) stop: Option<Stop>,
    #[serde(default)]
    pub(super) stream: bool,
    #[serde(default)]
    pub(super) stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub(super) n: Option<u32>,
    #[serde(default)]
    pub(super) frequency_penalty: Option<f64>,
    #[serde(default)]
    pub(super) presence_penalty: Option<f64>,
    /// Token id (as a string, OpenAI's form) → bias in [−100, 100].
    #[serde(default)]
    pub(super) logit_bias: Option<std::collections::BTreeMap<String, f64>>,
    /// Chat only (the route's field list refuses it elsewhere).
    #[serde(default)]
    pub(super) response_format: Option<Value>,
    /// Chat: `true`/`false`; completions: how many alternatives (0 to 5).
    #[serde(default)]
    pub(super) logprobs: Option<Value>,
    /// The end user (recorded pseudonymized).
    #[serde(default)]
    pub(super) user: Option<Value>,
    /// Chat only: alternatives per token (0 to 20), with `logprobs: true`.
    #[serde(default)]
    pub(super) top_logprobs: Option<u64>,
}

#[derive(Deserialize)]
pub(super) struct ChatRequest {
    pub(super) messages: Vec<ApiMessage>,
    #[serde(default)]
    pub(super) tools: Option<Vec<Value>>,
    #[serde(default)]
    pub(super) tool_choice: Option<Value>,
    #[serde(default)]
    pub(super) parallel_tool_calls: Option<bool>,
}

/// A chat message as clients send it: content as a string or as parts, and fields this server
/// does not implement (refused unless neutral: see [`ApiMessage::into_chat`]).
#[derive(Deserialize)]
pub(super) struct ApiMessage {
    pub(super) role: String,
    #[serde(default)]
    pub(super) content: Option<Content>,
    #[serde(flatten)]
    pub(super) rest: serde_json::Map<String, Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum Content {
    Text(String),
    Parts(Vec<Value>),
}

impl ApiMessage {
    /// The message the template renders, or a 400 naming the field (`messages[i].…`) this
    /// server does not implement. Text parts are joined with newlines (as vLLM joins them);
    /// `developer` is the system role under its newer name.
    pub(super) fn into_chat(self, i: usize) -> Result<ChatMessage, ApiError> {
        let at = |field: &str| format!("messages[{i}].{field}");
        let role = match self.role.as_str() {
            "system" | "user" | "assistant" | "tool" => self.role,
            "developer" => "system".to_string(),
            other => {
                return Err(ApiError::bad_param(
                    at("role"),
                    format!(
                    "role {other:?} is not supported (system, developer, user, assistant, tool)"
                ),
                ))
            }
        };
        let mut tool_calls = Vec::new();
        let mut tool_call_id = None;
        for (field, value) in self.rest {
            match (field.as_str(), value) {
                (_, Value::Null) => {}
                ("tool_calls", Value::Array(a)) if a.is_empty() => {}
                ("tool_calls", Value::Array(calls)) if role == "assistant" => {
                    for (j, call) in calls.into_iter().enumerate() {
                        tool_calls.push(history_call(call).map_err(|(f, m)| {
                            ApiError::bad_param(at(&format!("tool_calls[{j}]{f}")), m)
                        })?);
                    }
                }
                ("tool_call_id", Value::String(id)) if role == "tool" => tool_call_id = Some(id),
                (field, _) => {
                    return Err(ApiError::bad_param(
                        at(field),
                        format!("{field} in a {role} message is not supported by this server"),
                    ))
                }
            }
        }
        if role == "tool" && tool_call_id.is_none() {
            return Err(ApiError::bad_param(
                at("tool_call_id"),
                "a tool message needs the tool_call_id it answers",
            ));
        }
        // An assistant turn that only called tools has no content.
        let content = match self.content {
            None if !tool_calls.is_empty() => Some(Content::Text(String::new())),
            other => other,
        };
        let content = match content {
            Some(Content::Text(text)) => text,
            Some(Content::Parts(parts)) => {
                let mut texts = Vec::with_capacity(parts.len());
                for (j, part) in parts.iter().enumerate() {
                    let kind = part.get("type").and_then(Value::as_str);
                    let extra = part
                        .as_object()
                        .and_then(|o| o.keys().find(|k| *k != "type" && *k != "text"));
                    // A part of another type is refused by its type; a text part by any
                    // field it carries besides its text.
                    if let Some(extra) = extra.filter(|_| kind == Some("text")) {
                        return Err(ApiError::bad_param(
                            at(&format!("content[{j}].{extra}")),
                            format!("{extra} in a content part is not supported by this server"),
                        ));
                    }
                    match (kind, part.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(text)) => texts.push(text),
                        _ => {
                            return Err(ApiError::bad_param(
                                at(&format!("content[{j}].type")),
                                format!(
                                    "content part type {:?} is not supported; only text parts are",
                                    kind.unwrap_or("(none)")
                                ),
                            ))
                        }
                    }
                }
                texts.join("\n")
            }
            None => {
                return Err(ApiError::bad_param(
                    at("content"),
                    "every message needs content",
                ))
            }
        };
        Ok(ChatMessage {
            role,
            content,
            tool_calls,
            tool_call_id,
        })
    }
}

/// A tool call in the history, as OpenAI clients send it back (`arguments` a JSON text), in
/// the form templates read (`arguments` an object). Errors name the field under the call.
fn history_call(call: Value) -> Result<ToolCall, (&'static str, &'static str)> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Call {
        id: String,
        #[serde(rename = "type", default)]
        kind: Option<String>,
        function: Function,
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Function {
        name: String,
        arguments: String,
    }
    let call: Call = serde_json::from_value(call).map_err(|_| {
        (
            "",
            "a tool call is {id, type: \"function\", function: {name, arguments}}",
        )
    })?;
    if call.kind.as_deref().is_some_and(|k| k != "function") {
        return Err((".type", "only function tool calls are supported"));
    }
    let arguments: Value = serde_json::from_str(&call.function.arguments)
        .ok()
        .filter(Value::is_object)
        .ok_or((
            ".function.arguments",
            "arguments must be a JSON object (as text)",
        ))?;
    Ok(ToolCall {
        id: call.id,
        kind: "function".into(),
        function: FunctionCall {
            name: call.function.name,
            arguments,
        },
    })
}

#[derive(Deserialize)]
pub(super) struct CompletionRequest {
    pub(super) prompt: Value,
}

/// Embedding inputs: a string, a list of strings, token ids (a list of integers), or a list of
/// token-id lists. Ids are taken as they are (no special tokens added), as OpenAI takes them.
pub(super) fn embedding_inputs(input: Value) -> Result<Vec<EmbedInput>, ApiError> {
    let refuse = || {
        ApiError::bad_param(
            "input",
            "input is a string, a list of strings, a list of token ids, or a list of such lists",
        )
    };
    let ids = |list: &[Value]| -> Option<Vec<u32>> {
        list.iter()
            .map(|v| v.as_u64().and_then(|id| u32::try_from(id).ok()))
            .collect()
    };
    match input {
        Value::String(s) => Ok(vec![EmbedInput::Text(s)]),
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_number) => {
            Ok(vec![EmbedInput::Ids(ids(&items).ok_or_else(refuse)?)])
        }
        Value::Array(items) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(EmbedInput::Text(s)),
                Value::Array(list) => ids(&list).map(EmbedInput::Ids).ok_or_else(refuse),
                _ => Err(refuse()),
            })
            .collect(),
        _ => Err(refuse()),
    }
}

#[derive(Deserialize)]
pub(super) struct EmbeddingRequest {
    pub(super) model: String,
    pub(super) input: Value,
    #[serde(default)]
    pub(super) encoding_format: Option<String>,
    /// The end user (recorded pseudonymized).
    #[serde(default)]
    pub(super) user: Option<Value>,
}

pub(super) fn params(
    state: &AppState,
    s: &Sampling,
    vocab: usize,
) -> Result<GenerationParams, ApiError> {
    if s.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_param("n", "only n = 1 is supported"));
    }
    let penalty = |param: &'static str, value: Option<f64>| match value {
        None => Ok(0.0),
        Some(p) if p.is_finite() && (-2.0..=2.0).contains(&p) => Ok(p as f32),
        Some(_) => Err(ApiError::bad_param(
            param,
            format!("{param} must be between -2 and 2"),
        )),
    };
    let presence_penalty = penalty("presence_penalty", s.presence_penalty)?;
    let frequency_penalty = penalty("frequency_penalty", s.frequency_penalty)?;
    let logit_bias = logit_bias(s.logit_bias.as_ref(), vocab)?;
    let logprobs = logprobs(s)?;
    let grammar = match &s.response_format {
        None => None,
        Some(v) => response_format(v)?,
    };
    let max_tokens = s
        .max_completion_tokens
        .or(s.max_tokens)
        .unwrap_or(state.config.get().default_max_tokens);
    if max_tokens == 0 || max_tokens > state.config.get().max_tokens_cap {
        let param = match s.max_completion_tokens {
            Some(_) => "max_completion_tokens",
            None => "max_tokens",
        };
        return Err(ApiError::bad_param(
            param,
            format!(
                "{param} must be between 1 and {}",
                state.config.get().max_tokens_cap
            ),
        ));
    }
    if let Some(t) = s
        .temperature
        .filter(|t| !(t.is_finite() && (0.0..=2.0).contains(t)))
    {
        return Err(ApiError::bad_param(
            "temperature",
            format!("temperature must be between 0 and 2, got {t}"),
        ));
    }
    if let Some(p) = s
        .top_p
        .filter(|p| !(p.is_finite() && *p > 0.0 && *p <= 1.0))
    {
        return Err(ApiError::bad_param(
            "top_p",
            format!("top_p must be in (0, 1], got {p}"),
        ));
    }
    if s.stream_options.is_some() && !s.stream {
        return Err(ApiError::bad_param(
            "stream_options",
            "stream_options is only allowed with stream: true",
        ));
    }
    let stop = match &s.stop {
        None => Vec::new(),
        Some(Stop::One(x)) => vec![x.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stop.len() > 4 || stop.iter().any(|x| x.is_empty() || x.len() > 256) {
        return Err(ApiError::bad_param(
            "stop",
            "stop: at most 4 non-empty strings of up to 256 bytes",
        ));
    }
    Ok(GenerationParams {
        max_tokens: max_tokens as usize,
        sampling: SamplingParams {
            // OpenAI's default temperature is 1.
            temperature: s.temperature.unwrap_or(1.0),
            top_p: s.top_p.filter(|&p| p < 1.0),
            top_k: None,
            repetition_penalty: 1.0,
            seed: s.seed.unwrap_or_else(rand_seed),
            presence_penalty,
            frequency_penalty,
        },
        stop,
        max_prompt_tokens: Some(state.config.get().max_prompt_tokens),
        grammar,
        logit_bias,
        logprobs,
        ..GenerationParams::default()
    })
}

/// Log-probabilities asked for: chat's `logprobs: true` with `top_logprobs` (0–20), or
/// completions' `logprobs: n` (0–5). `None`: not asked.
fn logprobs(s: &Sampling) -> Result<Option<usize>, ApiError> {
    match (&s.logprobs, s.top_logprobs) {
        (None | Some(Value::Null) | Some(Value::Bool(false)), None | Some(0)) => Ok(None),
        (None | Some(Value::Null) | Some(Value::Bool(false)), Some(_)) => Err(ApiError::bad_param(
            "top_logprobs",
            "top_logprobs needs logprobs: true",
        )),
        (Some(Value::Bool(true)), top) => match top.unwrap_or(0) {
            n @ 0..=20 => Ok(Some(n as usize)),
            _ => Err(ApiError::bad_param(
                "top_logprobs",
                "top_logprobs is 0 to 20",
            )),
        },
        (Some(Value::Number(n)), None) => match n.as_u64() {
            Some(n @ 0..=5) => Ok(Some(n as usize)),
            _ => Err(ApiError::bad_param("logprobs", "logprobs is 0 to 5")),
        },
        _ => Err(ApiError::bad_param(
            "logprobs",
            "logprobs is true or false on chat, a count (0 to 5) on completions",
        )),
    }
}

/// At most this many `logit_bias` entries (OpenAI's own limit).
const MAX_LOGIT_BIAS: usize = 300;

/// `logit_bias`: token ids of this model's vocabulary, biases in [−100, 100].
fn logit_bias(
    bias: Option<&std::collections::BTreeMap<String, f64>>,
    vocab: usize,
) -> Result<Vec<(u32, f32)>, ApiError> {
    let Some(bias) = bias else {
        return Ok(Vec::new());
    };
    if bias.len() > MAX_LOGIT_BIAS {
        return Err(ApiError::bad_param(
            "logit_bias",
            format!("logit_bias has at most {MAX_LOGIT_BIAS} entries"),
        ));
    }
    bias.iter()
        .map(|(id, &b)| {
            // The canonical decimal form only: "+44" and "044" are not two spellings of 44.
            let token = id
                .parse::<u32>()
                .ok()
                .filter(|&t| (t as usize) < vocab && t.to_string() == *id);
            match token {
                Some(t) if b.is_finite() && (-100.0..=100.0).contains(&b) => Ok((t, b as f32)),
                Some(_) => Err(ApiError::bad_param(
                    "logit_bias",
                    format!("the bias for token {id} must be between -100 and 100"),
                )),
                None => Err(ApiError::bad_param(
                    "logit_bias",
                    format!(
                        "{id:?} is not a token id of this model (0 to {})",
                        vocab.saturating_sub(1)
                    ),
                )),
            }
        })
        .collect()
}

/// `response_format`: `text` (nothing to do), `json_object`, or `json_schema` with its
/// `schema`; anything else is a 400 naming the field. The grammar is checked for size and
/// nesting here, compiled in the worker.
pub(super) fn response_format(v: &Value) -> Result<Option<OutputGrammar>, ApiError> {
    let bad = |param: &str, msg: &str| ApiError::bad_param(param, msg);
    let Some(obj) = v.as_object() else {
        return Err(bad("response_format", "response_format must be an object"));
    };
    let grammar = match obj.get("type").and_then(Value::as_str) {
        Some("text") if obj.len() == 1 => return Ok(None),
        Some("json_object") if obj.len() == 1 => OutputGrammar::JsonObject,
        Some("json_schema") => {
            if let Some(extra) = obj.keys().find(|k| *k != "type" && *k != "json_schema") {
                return Err(bad(
                    &format!("response_format.{extra}"),
                    "unrecognized field in response_format",
                ));
            }
            let Some(spec) = obj.get("json_schema").and_then(Value::as_object) else {
                return Err(bad(
                    "response_format.json_schema",
                    "json_schema must be an object with name and schema",
                ));
            };
            for (field, value) in spec {
                let ok = match field.as_str() {
                    "name" | "description" => value.is_string(),
                    "strict" => value.is_boolean() || value.is_null(),
                    "schema" => value.is_object() || value == &Value::Bool(true),
                    _ => false,
                };
                if !ok {
                    return Err(bad(
                        &format!("response_format.json_schema.{field}"),
                        "unrecognized or ill-typed field in json_schema",
                    ));
                }
            }
            if !spec.get("name").is_some_and(Value::is_string) {
                return Err(bad(
                    "response_format.json_schema.name",
                    "json_schema needs a name",
                ));
            }
            // No schema: any JSON (as OpenAI's non-strict mode).
            let schema = spec.get("schema").cloned().unwrap_or(Value::Bool(true));
            OutputGrammar::JsonSchema {
                schema: schema.to_string(),
            }
        }
        _ => {
            return Err(bad(
                "response_format.type",
                "response_format type must be text, json_object or json_schema",
            ))
        }
    };
    grammar
        .check()
        .map_err(|e| ApiError::bad_param("response_format", e.to_string()))?;
    Ok(Some(grammar))
}

pub(super) fn rand_seed() -> u64 {
    use rand_core::RngCore;
    rand_core::OsRng.next_u64()
}

pub(super) fn finish(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        FinishReason::Stop | FinishReason::Cancelled => "stop",
    }
}

/// A completion's prompt as clients send it.
pub(super) enum CompletionPrompt {
    Text(String),
    /// Token ids, fed as they are (checked against the vocabulary where the model is known).
    Ids(Vec<u32>),
}

/// At most this many prompts in one completion request: each is a sequence of its own in the
/// engine's batch, so one request cannot take every slot of a server.
pub(super) const MAX_PROMPTS: usize = 8;

/// `prompt`: a string, token ids, a list of strings, or a list of lists of token ids (1 to
/// [`MAX_PROMPTS`] prompts, each answered as its own choice).
pub(super) fn completion_prompts(prompt: Value) -> Result<Vec<CompletionPrompt>, ApiError> {
    const SHAPE: &str =
        "prompt is a string, a list of token ids, or a list of strings or of token-id lists";
    let bad = |m: &str| ApiError::bad_param("prompt", m);
    let ids = |list: &[Value]| -> Result<Vec<u32>, ApiError> {
        list.iter()
            .map(|v| v.as_u64().and_then(|id| u32::try_from(id).ok()))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("token ids are non-negative integers"))
    };
    let list = match prompt {
        Value::String(s) => return Ok(vec![CompletionPrompt::Text(s)]),
        Value::Array(list) if !list.is_empty() && list.iter().all(Value::is_number) => {
            return Ok(vec![CompletionPrompt::Ids(ids(&list)?)])
        }
        Value::Array(list) if !list.is_empty() => list,
        _ => return Err(bad(SHAPE)),
    };
    if list.len() > MAX_PROMPTS {
        return Err(bad(&format!(
            "at most {MAX_PROMPTS} prompts per request; send the rest as further requests"
        )));
    }
    list.into_iter()
        .map(|p| match p {
            Value::String(s) => Ok(CompletionPrompt::Text(s)),
            Value::Array(inner) if !inner.is_empty() => Ok(CompletionPrompt::Ids(ids(&inner)?)),
            _ => Err(bad(SHAPE)),
        })
        .collect()
}
