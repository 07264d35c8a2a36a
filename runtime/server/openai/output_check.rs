//! The last word on a JSON answer: an answer the grammar engine completed is checked against
//! the request's schema by an independent validator (jsonschema) before it is reported as
//! complete. The engine is built to make this never fail; if it does (an engine limitation),
//! the client gets an error, never an answer that does not validate under `finish_reason:
//! "stop"`. The schema itself must be a valid JSON schema (checked against its meta-schema
//! before anything runs).

use serde_json::Value;

use super::error::ApiError;
use axum::http::StatusCode;

/// What a complete answer must be.
pub(crate) enum OutputCheck {
    /// Any JSON object (`json_object`).
    Object,
    /// Valid against this schema (`json_schema`).
    Schema(Box<jsonschema::Validator>),
}

impl OutputCheck {
    /// The check for a `response_format` already accepted by [`super::request::response_format`].
    pub(crate) fn for_format(format: Option<&Value>) -> Result<Option<Self>, ApiError> {
        let Some(format) = format else {
            return Ok(None);
        };
        match format.get("type").and_then(Value::as_str) {
            Some("json_object") => Ok(Some(OutputCheck::Object)),
            Some("json_schema") => {
                let schema = format["json_schema"]
                    .get("schema")
                    .cloned()
                    .unwrap_or(Value::Bool(true));
                jsonschema::validator_for(&schema)
                    .map(|v| Some(OutputCheck::Schema(Box::new(v))))
                    .map_err(|e| {
                        ApiError::bad_param(
                            "response_format",
                            format!("the schema is not a valid JSON schema: {e}"),
                        )
                    })
            }
            _ => Ok(None),
        }
    }

    /// Whether `text` is a complete, valid answer.
    pub(crate) fn accepts(&self, text: &str) -> bool {
        let Ok(value) = serde_json::from_str::<Value>(text) else {
            return false;
        };
        match self {
            OutputCheck::Object => value.is_object(),
            OutputCheck::Schema(v) => v.is_valid(&value),
        }
    }

    /// The error for an answer that failed the check.
    pub(crate) fn failed() -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "output_invalid",
            "the answer did not validate against the requested format (a limitation of the \
             grammar engine for this schema); nothing is returned as complete",
        )
    }
}
