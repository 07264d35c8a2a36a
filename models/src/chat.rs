//! Chat templates from `tokenizer_config.json`, rendered with minijinja the way Hugging Face
//! transformers renders them (`trim_blocks`, `lstrip_blocks`, `raise_exception`, Python string
//! methods, `messages` / `add_generation_prompt` / `bos_token` / `eos_token`).

use minijinja::{context, Environment, Error as JinjaError, ErrorKind};
use serde::{Deserialize, Serialize};

/// Instruction budget for one render: ample for thousands of messages with any public template.
const TEMPLATE_FUEL: u64 = 5_000_000;

/// One chat message. An assistant message may carry the tool calls it made, a `tool` message
/// the id of the call it answers: templates read them as `message.tool_calls` and
/// `message.tool_call_id` (absent when empty, as in transformers).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<crate::tools::ToolCall>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }
}

/// Why a chat prompt could not be rendered.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ChatError {
    #[error("the model has no chat template (tokenizer_config.json has no \"chat_template\")")]
    NoTemplate,
    #[error("tokenizer_config.json: {0}")]
    Config(String),
    #[error("chat template error: {0}")]
    Template(String),
}

/// A compiled chat template with the special tokens it may reference.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// Whether the template reads `tools` (else tools are described in a system message).
    knows_tools: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TemplateField {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TokenField {
    Text(String),
    Added { content: String },
}

impl TokenField {
    fn into_text(self) -> String {
        match self {
            TokenField::Text(s) | TokenField::Added { content: s } => s,
        }
    }
}

#[derive(Deserialize)]
struct TokenizerConfig {
    chat_template: Option<TemplateField>,
    bos_token: Option<TokenField>,
    eos_token: Option<TokenField>,
}

impl ChatTemplate {
    /// Reads the template from `tokenizer_config.json` bytes.
    pub fn from_tokenizer_config(bytes: &[u8]) -> Result<Self, ChatError> {
        let cfg: TokenizerConfig =
            serde_json::from_slice(bytes).map_err(|e| ChatError::Config(e.to_string()))?;
        let source = match cfg.chat_template {
            None => return Err(ChatError::NoTemplate),
            Some(TemplateField::One(s)) => s,
            Some(TemplateField::Named(list)) => list
                .into_iter()
                .find(|t| t.name == "default")
                .map(|t| t.template)
                .ok_or_else(|| {
                    ChatError::Config("no \"default\" chat template in the list".into())
                })?,
        };
        Self::new(
            source,
            cfg.bos_token.map(TokenField::into_text).unwrap_or_default(),
            cfg.eos_token.map(TokenField::into_text).unwrap_or_default(),
        )
    }

    /// Compiles a template.
    pub fn new(source: String, bos_token: String, eos_token: String) -> Result<Self, ChatError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // Templates come with the model: bound their work so one cannot spin forever.
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, JinjaError> {
                Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
            },
        );
        let knows_tools = source.contains("tools");
        env.add_template_owned("chat", source)
            .map_err(|e| ChatError::Template(e.to_string()))?;
        Ok(ChatTemplate {
            env,
            bos_token,
            eos_token,
            knows_tools,
        })
    }

    /// Renders `messages`, ending with the assistant turn opener when `add_generation_prompt`.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        self.render_with_tools(messages, &[], add_generation_prompt)
    }

    /// Renders with `tools` (OpenAI's `{"type": "function", "function": {...}}` objects, the
    /// form transformers passes): as the template's `tools` when it reads them, else described
    /// in a system message, with earlier calls and results written as text
    /// ([`crate::tools::without_template_support`]).
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: &[serde_json::Value],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| ChatError::Template(e.to_string()))?;
        let uses_tools = !tools.is_empty()
            || messages
                .iter()
                .any(|m| !m.tool_calls.is_empty() || m.role == "tool");
        let rewritten;
        let messages = if uses_tools && !self.knows_tools {
            rewritten = crate::tools::without_template_support(messages, tools);
            &rewritten[..]
        } else {
            messages
        };
        let tools = (!tools.is_empty() && self.knows_tools).then_some(tools);
        tmpl.render(context! {
            messages => messages,
            tools => tools,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| ChatError::Template(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are helpful<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    #[test]
    fn renders_chatml_with_generation_prompt() {
        let t = ChatTemplate::new(CHATML.into(), String::new(), String::new()).unwrap();
        let out = t.render(&[ChatMessage::new("user", "Hi")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t.render(&[ChatMessage::new("user", "Hi")], false).unwrap();
        assert!(!out.ends_with("assistant\n"));
    }

    #[test]
    fn trim_and_lstrip_blocks_like_transformers() {
        let src = "{% for m in messages %}\n    {{ m.content }}\n{% endfor %}";
        let t = ChatTemplate::new(src.into(), String::new(), String::new()).unwrap();
        let out = t
            .render(
                &[ChatMessage::new("user", "a"), ChatMessage::new("user", "b")],
                false,
            )
            .unwrap();
        assert_eq!(out, "    a\n    b\n");
    }

    #[test]
    fn bos_eos_and_python_methods() {
        let src = "{{ bos_token }}{% for m in messages %}{{ m.content.strip() | upper }}{% endfor %}{{ eos_token }}";
        let t = ChatTemplate::new(src.into(), "<s>".into(), "</s>".into()).unwrap();
        assert_eq!(
            t.render(&[ChatMessage::new("user", "  hi ")], false)
                .unwrap(),
            "<s>HI</s>"
        );
    }

    #[test]
    fn raise_exception_is_an_error_not_a_panic() {
        let src = "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}";
        let t = ChatTemplate::new(src.into(), String::new(), String::new()).unwrap();
        let err = t
            .render(&[ChatMessage::new("assistant", "x")], false)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("first message must be from the user"),
            "{err}"
        );
    }

    #[test]
    fn runaway_template_runs_out_of_fuel() {
        let src = "{% for i in range(10000) %}{% for j in range(10000) %}x{% endfor %}{% endfor %}";
        let t = ChatTemplate::new(src.into(), String::new(), String::new()).unwrap();
        let err = t.render(&[], false).unwrap_err();
        assert!(err.to_string().contains("fuel"), "{err}");
    }

    #[test]
    fn tokenizer_config_variants() {
        let cfg = br#"{"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ bos_token }}D"}], "bos_token": {"content": "<s>", "lstrip": false}}"#;
        let t = ChatTemplate::from_tokenizer_config(cfg).unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "<s>D");
        assert!(matches!(
            ChatTemplate::from_tokenizer_config(b"{}"),
            Err(ChatError::NoTemplate)
        ));
        assert!(matches!(
            ChatTemplate::from_tokenizer_config(b"[1"),
            Err(ChatError::Config(_))
        ));
        assert!(matches!(
            ChatTemplate::new("{% for %}".into(), String::new(), String::new()),
            Err(ChatError::Template(_))
        ));
    }

    /// A tool-capable template in the form of Qwen2.5's (tools listed as JSON in the system
    /// turn, calls written from `message.tool_calls` with `function.arguments | tojson`, results
    /// from the `tool` role wrapped in `<tool_response>`): tools reach it as transformers
    /// passes them, calls in the history as objects.
    #[test]
    fn a_tool_capable_template_gets_tools_calls_and_results() {
        let src = r#"{%- if tools %}{{- '<|im_start|>system\n' }}{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}{{- "\n\n# Tools\n\n<tools>" }}{%- for tool in tools %}{{- "\n" }}{{- tool | tojson }}{%- endfor %}{{- "\n</tools><|im_end|>\n" }}{%- endif %}{%- for message in messages %}{%- if message.role == "user" or (message.role == "system" and not loop.first) %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}{%- elif message.role == "assistant" %}{{- '<|im_start|>' + message.role }}{%- if message.content %}{{- '\n' + message.content }}{%- endif %}{%- for tool_call in message.tool_calls %}{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}{{- '\n<tool_call>\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}{{- tool_call.arguments | tojson }}{{- '}\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\n' }}{%- elif message.role == "tool" %}{{- '<|im_start|>user\n<tool_response>\n' }}{{- message.content }}{{- '\n</tool_response><|im_end|>\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"#;
        let t = ChatTemplate::new(src.into(), String::new(), String::new()).unwrap();
        assert!(t.knows_tools);
        let tool = serde_json::json!({"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}});
        let mut call = ChatMessage::new("assistant", "");
        call.tool_calls.push(crate::tools::ToolCall {
            id: "call_1".into(),
            kind: "function".into(),
            function: crate::tools::FunctionCall {
                name: "get_weather".into(),
                arguments: serde_json::json!({"city": "Paris"}),
            },
        });
        let mut result = ChatMessage::new("tool", "18 C");
        result.tool_call_id = Some("call_1".into());
        let messages = [ChatMessage::new("user", "Weather in Paris?"), call, result];
        let out = t.render_with_tools(&messages, &[tool], true).unwrap();
        assert!(out.contains("<tools>\n{"), "{out}");
        assert!(out.contains("\"name\":\"get_weather\""), "{out}");
        assert!(
            out.contains("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\":\"Paris\"}}\n</tool_call>"),
            "{out}"
        );
        assert!(
            out.contains("<tool_response>\n18 C\n</tool_response>"),
            "{out}"
        );
        assert!(out.ends_with("<|im_start|>assistant\n"), "{out}");
    }

    /// A template that does not read `tools` (SmolLM2's kind) gets them described in a system
    /// message, and earlier calls and results as text in the same form the model answers in.
    #[test]
    fn a_template_without_tools_gets_them_as_text() {
        let t = ChatTemplate::new(CHATML.into(), String::new(), String::new()).unwrap();
        assert!(!t.knows_tools);
        let tool = serde_json::json!({"type": "function", "function": {"name": "f"}});
        let mut call = ChatMessage::new("assistant", "");
        call.tool_calls.push(crate::tools::ToolCall {
            id: "c".into(),
            kind: "function".into(),
            function: crate::tools::FunctionCall {
                name: "f".into(),
                arguments: serde_json::json!({}),
            },
        });
        let mut result = ChatMessage::new("tool", "done");
        result.tool_call_id = Some("c".into());
        let out = t
            .render_with_tools(
                &[ChatMessage::new("user", "go"), call, result],
                &[tool],
                true,
            )
            .unwrap();
        assert!(
            out.starts_with("<|im_start|>system\nYou can call these tools:"),
            "{out}"
        );
        assert!(
            out.contains("<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>"),
            "{out}"
        );
        assert!(
            out.contains("<|im_start|>user\n<tool_response>\ndone\n</tool_response>"),
            "{out}"
        );
    }
}
