//! Which request fields each OpenAI route takes. A field is implemented, or caller metadata
//! (accepted, as OpenAI accepts it; `user` is recorded as a pseudonym), or a feature not
//! implemented here, accepted only in the form that asks for nothing (`null`, `false`, empty,
//! `n: 1`); anything else is refused with a 400 naming it in `param`. No field is silently
//! ignored: a client asking for audio, predictions or several choices learns it did not get
//! them. Unknown fields are refused too, as OpenAI refuses them.

use serde_json::Value;

/// The routes with a request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Chat,
    Completions,
    Embeddings,
}

/// Fields both generation routes implement.
const SAMPLING: &[&str] = &[
    "model",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "stream",
    "stream_options",
    // Checked where the value is read: 1 only, 0 only.
    "n",
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    // A boolean on chat (with `top_logprobs`), a count on completions (checked where read).
    "logprobs",
];

/// Fields only chat implements.
const CHAT: &[&str] = &[
    "messages",
    "top_logprobs",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
];

/// Caller metadata: it changes no answer here, and OpenAI takes it on every route.
pub const METADATA: &[&str] = &["user", "metadata", "store", "service_tier"];

/// Features not implemented here, by route, each accepted only in its neutral form.
const NOT_IMPLEMENTED: &[(&str, &[Route])] = &[
    ("functions", &[Route::Chat]),
    ("function_call", &[Route::Chat]),
    ("modalities", &[Route::Chat]),
    ("audio", &[Route::Chat]),
    ("prediction", &[Route::Chat]),
    ("reasoning_effort", &[Route::Chat]),
    ("web_search_options", &[Route::Chat]),
    ("echo", &[Route::Completions]),
    ("best_of", &[Route::Completions]),
    ("suffix", &[Route::Completions]),
    ("dimensions", &[Route::Embeddings]),
];

/// A field refused: the 400's `param` and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub param: String,
    pub message: String,
}

fn implemented(route: Route, field: &str) -> bool {
    match route {
        Route::Chat => CHAT.contains(&field) || SAMPLING.contains(&field),
        Route::Completions => field == "prompt" || SAMPLING.contains(&field),
        Route::Embeddings => ["model", "input", "encoding_format"].contains(&field),
    }
}

/// Whether `value` asks for nothing of the unimplemented `field`.
fn neutral(field: &str, value: &Value) -> bool {
    match (field, value) {
        (_, Value::Null) => true,
        ("echo", Value::Bool(false)) => true,
        ("best_of", v) => v.as_u64() == Some(1),
        ("functions" | "modalities", Value::Array(a)) => {
            a.is_empty() || (field == "modalities" && a.iter().all(|m| m == "text"))
        }
        ("function_call", Value::String(s)) => s == "none",
        ("suffix", Value::String(s)) => s.is_empty(),
        _ => false,
    }
}

/// Checks every top-level field of a request body for `route`.
pub fn check(route: Route, body: &Value) -> Result<(), Refused> {
    let Some(fields) = body.as_object() else {
        return Err(Refused {
            param: String::new(),
            message: "the request body must be a JSON object".into(),
        });
    };
    for (field, value) in fields {
        if implemented(route, field) || METADATA.contains(&field.as_str()) {
            continue;
        }
        let known = NOT_IMPLEMENTED
            .iter()
            .any(|(name, routes)| name == field && routes.contains(&route));
        if known {
            if neutral(field, value) {
                continue;
            }
            return Err(Refused {
                param: field.clone(),
                message: format!("{field} is not supported by this server"),
            });
        }
        return Err(Refused {
            param: field.clone(),
            message: format!("unrecognized request argument supplied: {field}"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn refused(route: Route, body: Value) -> Option<String> {
        check(route, &body).err().map(|r| r.param)
    }

    #[test]
    fn features_not_implemented_are_refused_by_name_unless_neutral() {
        let chat = |extra: Value| {
            let mut b = json!({"model": "m", "messages": []});
            b.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            refused(Route::Chat, b)
        };
        for (field, value) in [
            ("functions", json!([{"name": "f"}])),
            ("function_call", json!("auto")),
            ("modalities", json!(["audio"])),
            ("temperaturee", json!(1)),
        ] {
            assert_eq!(
                chat(json!({ field: value })).as_deref(),
                Some(field),
                "{field}"
            );
        }
        for (field, value) in [
            ("response_format", json!({"type": "text"})),
            ("logit_bias", json!({"42": 5})),
            ("tools", json!([])),
            ("tool_choice", json!("required")),
            ("logprobs", json!(true)),
            ("top_logprobs", json!(3)),
            ("logit_bias", json!({})),
            ("user", json!("u-1")),
            ("parallel_tool_calls", json!(true)),
            ("functions", Value::Null),
        ] {
            assert_eq!(chat(json!({ field: value })), None, "{field}");
        }
        assert_eq!(
            refused(
                Route::Embeddings,
                json!({"model": "m", "input": "x", "dimensions": 8})
            )
            .as_deref(),
            Some("dimensions")
        );
        // A field of another route is unknown here.
        assert_eq!(
            refused(
                Route::Completions,
                json!({"model": "m", "prompt": "x", "messages": []})
            )
            .as_deref(),
            Some("messages")
        );
        assert!(refused(Route::Chat, json!([1])).is_some());
    }
}
