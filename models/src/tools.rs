//! Tool calling. The model writes each call as
//!
//! ```text
//! <tool_call>
//! {"name": "get_weather", "arguments": {"city": "Paris"}}
//! </tool_call>
//! ```
//!
//! (the Hermes form that Qwen2.5, Hermes and SmolLM3 templates teach), under a grammar built from
//! the tools' own parameter schemas ([`grammar`]), so a call always names a real tool and its
//! arguments always validate. [`parse_calls`] reads the calls back.
//!
//! Templates that read `tools` get them as transformers passes them; for the others
//! [`without_template_support`] describes the tools in a system message and writes earlier calls
//! and results as text in the same form.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::chat::ChatMessage;
use crate::grammar::{GrammarError, OutputGrammar};

/// Where a call starts and ends in the output.
pub const CALL_OPEN: &str = "<tool_call>\n";
pub const CALL_CLOSE: &str = "\n</tool_call>";

/// At most this many tools per request.
pub const MAX_TOOLS: usize = 64;

/// At most this many calls in one answer (when parallel calls are allowed).
pub const MAX_PARALLEL_CALLS: usize = 8;

/// A call as chat templates (and OpenAI's history) hold it: arguments as an object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    pub arguments: Value,
}

/// A tool the model may call: its name and the JSON schema of its arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub parameters: Value,
}

/// Which calls the answer must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// Text or calls, as the model decides.
    Auto,
    /// At least one call.
    Required,
    /// A call of this tool.
    Named(String),
}

/// The grammar of an answer: calls of `tools` (one, or up to [`MAX_PARALLEL_CALLS`] when
/// `parallel`), or with [`ToolChoice::Auto`] also plain text, which then cannot begin with the
/// call marker's `<`.
pub fn grammar(
    tools: &[Tool],
    choice: &ToolChoice,
    parallel: bool,
) -> Result<OutputGrammar, GrammarError> {
    let callable: Vec<&Tool> = match choice {
        ToolChoice::Named(name) => tools.iter().filter(|t| &t.name == name).collect(),
        _ => tools.iter().collect(),
    };
    if callable.is_empty() {
        return Err(GrammarError::Invalid("no tool matches tool_choice".into()));
    }
    // One rule per tool, its arguments a JSON schema of its own (so `#` and `$defs` in a
    // tool's parameters resolve within them, never against a wrapper of ours). The call's text
    // is written exactly as `{"name": "<name>", "arguments": <arguments>}`.
    let compact =
        json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "});
    let mut rules = String::new();
    let mut bodies = Vec::with_capacity(callable.len());
    for (k, t) in callable.iter().enumerate() {
        crate::grammar::check_depth(&t.parameters)?;
        let mut schema = t.parameters.clone();
        match &mut schema {
            Value::Object(map) => {
                map.insert("x-guidance".into(), compact.clone());
            }
            _ => {
                return Err(GrammarError::Invalid(
                    "tool parameters are a JSON object schema".into(),
                ))
            }
        }
        let head = format!(
            "{{\"name\": {}, \"arguments\": ",
            Value::String(t.name.clone())
        );
        rules.push_str(&format!(
            "body_{k}: {} args_{k} \"}}\"\nargs_{k}: %json {schema}\n",
            lark_string(&head)
        ));
        bodies.push(format!("body_{k}"));
    }
    let calls = if parallel {
        format!(
            "calls: call (\"\\n\" call){{0,{}}}\n",
            MAX_PARALLEL_CALLS - 1
        )
    } else {
        "calls: call\n".into()
    };
    let calls = format!(
        "{calls}call: {open} body {close}\nbody: {}\n{rules}",
        bodies.join(" | "),
        open = lark_string(CALL_OPEN),
        close = lark_string(CALL_CLOSE),
    );
    let start = match choice {
        ToolChoice::Auto => "start: TEXT | calls\nTEXT: /[^<](.|\\n)*/\n",
        _ => "start: calls\n",
    };
    let grammar = OutputGrammar::Lark {
        grammar: format!("{start}{calls}"),
    };
    grammar.check()?;
    Ok(grammar)
}

/// A Lark string literal.
fn lark_string(s: &str) -> String {
    // JSON string escaping is valid Lark string escaping for these characters.
    Value::String(s.into()).to_string()
}

/// The calls in an answer, if it is made of calls (name, arguments) and nothing else.
///
/// Only the exact form the grammar produces counts (no leading text or whitespace: under
/// `auto`, text that merely looks like a call is text), and only calls of `tools`.
pub fn parse_calls(text: &str, tools: &[&str]) -> Option<Vec<(String, Value)>> {
    let mut rest = text;
    let mut calls = Vec::new();
    loop {
        let body = rest.strip_prefix(CALL_OPEN)?;
        let (body, after) = body.split_once(CALL_CLOSE)?;
        let mut call: serde_json::Map<String, Value> = serde_json::from_str(body).ok()?;
        let name = call.remove("name")?.as_str()?.to_string();
        let arguments = call.remove("arguments")?;
        if !call.is_empty() || !arguments.is_object() || !tools.contains(&name.as_str()) {
            return None;
        }
        calls.push((name, arguments));
        match after.strip_prefix('\n') {
            Some(next) => rest = next,
            None if after.is_empty() => return Some(calls),
            None => return None,
        }
    }
}

/// For a template that does not read `tools`: the tools described in the system message (added
/// if there is none), earlier calls written into their assistant messages, and tool results
/// given as `user` messages in `<tool_response>` tags (templates that know no `tool` role
/// would refuse or mislabel them).
pub fn without_template_support(messages: &[ChatMessage], tools: &[Value]) -> Vec<ChatMessage> {
    let mut out = Vec::with_capacity(messages.len() + 1);
    if !tools.is_empty() {
        let list: Vec<String> = tools.iter().map(Value::to_string).collect();
        let instructions = format!(
            "You can call these tools:\n{}\n\nTo call a tool, answer only with\n{}{{\"name\": <tool name>, \"arguments\": <arguments object>}}{}",
            list.join("\n"),
            CALL_OPEN,
            CALL_CLOSE
        );
        match messages.first() {
            Some(first) if first.role == "system" => {
                let mut system = first.clone();
                system.content = format!("{}\n\n{instructions}", system.content);
                out.push(system);
            }
            _ => out.push(ChatMessage::new("system", instructions)),
        }
    }
    let skip =
        usize::from(!tools.is_empty() && messages.first().is_some_and(|m| m.role == "system"));
    for m in &messages[skip..] {
        let mut m = m.clone();
        if m.role == "tool" {
            m = ChatMessage::new(
                "user",
                format!("<tool_response>\n{}\n</tool_response>", m.content),
            );
        } else if !m.tool_calls.is_empty() {
            let calls: Vec<String> = m
                .tool_calls
                .iter()
                .map(|c| {
                    // The form the model answers in: name first.
                    format!(
                        "{CALL_OPEN}{{\"name\": {}, \"arguments\": {}}}{CALL_CLOSE}",
                        Value::String(c.function.name.clone()),
                        c.function.arguments
                    )
                })
                .collect();
            let text = calls.join("\n");
            m.content = match m.content.is_empty() {
                true => text,
                false => format!("{}\n{text}", m.content),
            };
            m.tool_calls.clear();
        }
        out.push(m);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_parse_back_and_anything_else_is_text() {
        let text = "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": 1}}\n</tool_call>\n<tool_call>\n{\"name\": \"g\", \"arguments\": {}}\n</tool_call>";
        let calls = parse_calls(text, &["f", "g"]).unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0], ("f".into(), json!({"x": 1})));
        // A tool not offered, or text around the calls: not calls.
        assert_eq!(parse_calls(text, &["f"]), None);
        assert_eq!(parse_calls(&format!(" {text}"), &["f", "g"]), None);
        for not_calls in [
            "",
            "hello",
            "<tool_call>\n{\"name\": \"f\"}\n</tool_call>",
            "<tool_call>\n{\"name\": \"f\", \"arguments\": 3}\n</tool_call>",
            "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call> and text",
            "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}",
        ] {
            assert_eq!(parse_calls(not_calls, &["f"]), None, "{not_calls}");
        }
    }

    #[test]
    fn a_named_choice_must_name_a_tool() {
        let tools = [Tool {
            name: "f".into(),
            parameters: json!({"type": "object"}),
        }];
        assert!(grammar(&tools, &ToolChoice::Named("g".into()), false).is_err());
        assert!(grammar(&tools, &ToolChoice::Named("f".into()), true).is_ok());
    }
}
