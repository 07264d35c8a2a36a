//! `tools`, `tool_choice` and `parallel_tool_calls` on chat completions: checked here, given to
//! the template, turned into the grammar calls are generated under, and the answer's calls
//! returned as OpenAI's `tool_calls` ([`securerun_models::tools`] has the format).

use std::sync::Arc;

use serde_json::{json, Value};

use securerun_models::grammar::{self, OutputGrammar};
use securerun_models::tools::{self, Tool, ToolChoice, MAX_TOOLS};
use securerun_models::PromptEncoder;

use super::error::ApiError;

/// What a chat request asked of tools.
#[derive(Default)]
pub(crate) struct ToolPlan {
    /// The tools, as the template gets them (OpenAI's function objects).
    pub(crate) for_template: Vec<Value>,
    /// The only calls an answer may hold, and what their arguments must be.
    pub(crate) checks: Arc<ToolChecks>,
    /// The grammar of the answer (none: no calls possible).
    pub(crate) grammar: Option<OutputGrammar>,
    /// Whether the answer must be calls (`required` or a named tool): nothing is streamed as
    /// text. With `auto` an answer that starts with `<` is calls (text cannot).
    pub(crate) forced: bool,
}

impl ToolPlan {
    pub(crate) fn active(&self) -> bool {
        self.grammar.is_some()
    }
}

/// Each tool's name and its parameters' validator.
#[derive(Default)]
pub(crate) struct ToolChecks {
    validators: Vec<(String, jsonschema::Validator)>,
}

/// What an answer turned out to be.
pub(crate) enum Answer {
    /// Text (under `auto`), or output cut short of a complete call.
    Text,
    /// Calls in OpenAI's form, each of an offered tool with arguments that validate.
    Calls(Vec<Value>),
    /// Calls whose arguments do not validate against their tool (an engine limitation).
    Invalid,
}

/// OpenAI's function names: letters, digits, `_` and `-`, at most 64.
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Checks `tools`, `tool_choice` and `parallel_tool_calls`. Text that reaches the template
/// outside message contents must not spell a control token (a description could otherwise
/// close the system turn and open another).
pub(crate) fn plan(
    tools: Option<Vec<Value>>,
    choice: Option<Value>,
    parallel: Option<bool>,
    encoder: &PromptEncoder,
) -> Result<ToolPlan, ApiError> {
    let tools = tools.unwrap_or_default();
    if tools.len() > MAX_TOOLS {
        return Err(ApiError::bad_param(
            "tools",
            format!("at most {MAX_TOOLS} tools are accepted"),
        ));
    }
    let mut parsed: Vec<Tool> = Vec::with_capacity(tools.len());
    let mut validators = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        let at = |f: &str| format!("tools[{i}]{f}");
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(ApiError::bad_param(
                at(".type"),
                "only function tools are supported",
            ));
        }
        let Some(f) = t.get("function").and_then(Value::as_object) else {
            return Err(ApiError::bad_param(
                at(".function"),
                "a tool needs a function",
            ));
        };
        if let Some(extra) = t
            .as_object()
            .and_then(|o| o.keys().find(|k| *k != "type" && *k != "function"))
        {
            return Err(ApiError::bad_param(
                at(&format!(".{extra}")),
                "unrecognized tool field",
            ));
        }
        for (field, value) in f {
            let ok = match field.as_str() {
                "name" | "description" => value.is_string(),
                "parameters" => value.is_object(),
                "strict" => value.is_boolean() || value.is_null(),
                _ => false,
            };
            if !ok {
                return Err(ApiError::bad_param(
                    at(&format!(".function.{field}")),
                    "unrecognized or ill-typed function field",
                ));
            }
        }
        let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
        if !valid_name(name) {
            return Err(ApiError::bad_param(
                at(".function.name"),
                "a function name is 1 to 64 letters, digits, _ or -",
            ));
        }
        if parsed.iter().any(|p| p.name == name) {
            return Err(ApiError::bad_param(
                at(".function.name"),
                format!("two tools are named {name:?}"),
            ));
        }
        if encoder.spells_control_token(&t.to_string()) {
            return Err(ApiError::bad_param(
                at(""),
                "a tool may not contain the text of one of the model's control tokens",
            ));
        }
        let parameters = f
            .get("parameters")
            .cloned()
            .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
        // Arguments are an object: a schema that allows anything else cannot be a call.
        if parameters.get("type").and_then(Value::as_str) != Some("object") {
            return Err(ApiError::bad_param(
                at(".function.parameters"),
                "parameters is a JSON schema of type \"object\"",
            ));
        }
        grammar::check_depth(&parameters)
            .map_err(|e| ApiError::bad_param(at(".function.parameters"), e.to_string()))?;
        // A valid JSON schema on its own (its `#` is itself): the validator every call's
        // arguments must pass.
        let validator = jsonschema::validator_for(&parameters).map_err(|e| {
            ApiError::bad_param(
                at(".function.parameters"),
                format!("not a valid JSON schema: {e}"),
            )
        })?;
        validators.push((name.to_string(), validator));
        parsed.push(Tool {
            name: name.to_string(),
            parameters,
        });
    }
    let choice = match choice {
        None | Some(Value::Null) => (!parsed.is_empty()).then_some(ToolChoice::Auto),
        Some(Value::String(s)) => match s.as_str() {
            "none" => None,
            "auto" => Some(ToolChoice::Auto),
            "required" => Some(ToolChoice::Required),
            _ => {
                return Err(ApiError::bad_param(
                    "tool_choice",
                    "tool_choice is none, auto, required or a named function",
                ))
            }
        },
        Some(v) => {
            let shape_ok = v.as_object().is_some_and(|o| {
                o.keys().all(|k| k == "type" || k == "function")
                    && o.get("function")
                        .and_then(Value::as_object)
                        .is_some_and(|f| f.keys().all(|k| k == "name"))
            });
            if !shape_ok {
                return Err(ApiError::bad_param(
                    "tool_choice",
                    "a named tool_choice is {\"type\": \"function\", \"function\": {\"name\"}}",
                ));
            }
            let name = v
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| v.get("type").and_then(Value::as_str) == Some("function"));
            match name {
                Some(n) if parsed.iter().any(|t| t.name == n) => {
                    Some(ToolChoice::Named(n.to_string()))
                }
                _ => {
                    return Err(ApiError::bad_param(
                        "tool_choice",
                        "tool_choice names a function that is not among the tools",
                    ))
                }
            }
        }
    };
    let Some(choice) = choice else {
        // No calls: the tools are not offered either (`none`).
        return Ok(ToolPlan::default());
    };
    if parsed.is_empty() {
        return Err(ApiError::bad_param(
            "tool_choice",
            "tool_choice needs tools",
        ));
    }
    let grammar = tools::grammar(&parsed, &choice, parallel.unwrap_or(true))
        .map_err(|e| ApiError::bad_param("tools", e.to_string()))?;
    Ok(ToolPlan {
        for_template: tools,
        checks: Arc::new(ToolChecks { validators }),
        grammar: Some(grammar),
        forced: choice != ToolChoice::Auto,
    })
}

/// What an answer is: calls in OpenAI's form (`arguments` as JSON text, a fresh id each), if it
/// is made of calls of offered tools, each checked against its tool's own schema.
pub(crate) fn read_answer(text: &str, checks: &ToolChecks) -> Answer {
    let names: Vec<&str> = checks.validators.iter().map(|(n, _)| n.as_str()).collect();
    let Some(calls) = tools::parse_calls(text, &names) else {
        return Answer::Text;
    };
    let valid = calls.iter().all(|(name, arguments)| {
        checks
            .validators
            .iter()
            .any(|(n, v)| n == name && v.is_valid(arguments))
    });
    if !valid {
        return Answer::Invalid;
    }
    Answer::Calls(
        calls
            .into_iter()
            .map(|(name, arguments)| {
                json!({"id": super::complete::request_id("call"), "type": "function",
                       "function": {"name": name, "arguments": arguments.to_string()}})
            })
            .collect(),
    )
}
