//! `POST /v1/rerank` (and `/rerank`): documents ordered by relevance to a query, in the
//! Cohere/Jina shape llama-server and TEI serve. Served by embedding models: the relevance is
//! the cosine similarity of the query's and each document's embedding (a cross-encoder would
//! score pairs; none is served here yet).

use std::sync::Arc;

use axum::extract::{Extension, State};
use axum::response::Response;
use serde_json::{json, Value};

use super::embeddings::{embed_inputs, input_response};
use super::error::ApiError;
use super::{model_name, only_fields, parse_json, record_end_user, served_model};
use crate::server::auth::Caller;
use crate::server::ledger::Ledger;
use crate::server::AppState;

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let n = norm(a) * norm(b);
    if n > 0.0 {
        dot / n
    } else {
        0.0
    }
}

pub async fn rerank(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Extension(ledger): Extension<Ledger>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let body: Value = parse_json(&body)?;
    only_fields(
        &body,
        &[
            "model",
            "query",
            "documents",
            "top_n",
            "return_documents",
            "user",
        ],
    )?;
    record_end_user(&state, &ledger, body.get("user"))?;
    let served = served_model(&state, &caller, &ledger, model_name(&body)?)?;
    if served.engine.is_text {
        return Err(ApiError::bad_param(
            "model",
            "reranking needs an embedding model; this one generates text",
        ));
    }
    let query = body
        .get("query")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_param("query", "query is a string"))?
        .to_string();
    let documents: Vec<String> = body
        .get("documents")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::bad_param("documents", "documents is a list"))?
        .iter()
        .enumerate()
        .map(|(i, d)| {
            d.as_str()
                .or_else(|| {
                    let o = d.as_object().filter(|o| o.len() == 1)?;
                    o.get("text").and_then(Value::as_str)
                })
                .map(str::to_string)
                .ok_or_else(|| {
                    ApiError::bad_param(
                        format!("documents[{i}]"),
                        "a document is a string or {\"text\": string}",
                    )
                })
        })
        .collect::<Result<_, _>>()?;
    // The query is one more input: together within the embedding input cap.
    if documents.is_empty() || documents.len() >= state.config.get().max_embedding_inputs {
        return Err(ApiError::bad_param(
            "documents",
            format!(
                "documents must hold 1 to {} texts",
                state.config.get().max_embedding_inputs.saturating_sub(1)
            ),
        ));
    }
    let top_n = match body.get("top_n") {
        None | Some(Value::Null) => documents.len(),
        Some(v) => v
            .as_u64()
            .filter(|&n| n >= 1)
            .ok_or_else(|| ApiError::bad_param("top_n", "top_n is a positive integer"))?
            .min(documents.len() as u64) as usize,
    };
    let return_documents = match body.get("return_documents") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ApiError::bad_param(
                "return_documents",
                "return_documents is a boolean",
            ))
        }
    };
    let mut texts = Vec::with_capacity(documents.len() + 1);
    texts.push(query);
    texts.extend(documents.iter().cloned());
    let audited = texts.clone();
    let inputs = texts
        .into_iter()
        .map(securerun_models::EmbedInput::Text)
        .collect();
    let (vectors, input_tokens) = embed_inputs(&state, &caller, &served, inputs).await?;
    let (q, docs) = vectors
        .split_first()
        .ok_or_else(super::complete::engine_stopped)?;
    let mut scored: Vec<(usize, f64)> = docs
        .iter()
        .enumerate()
        .map(|(i, d)| (i, cosine(q, d)))
        .collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    scored.truncate(top_n);
    let results: Vec<Value> = scored
        .into_iter()
        .map(|(i, score)| {
            let mut r = json!({"index": i, "relevance_score": score});
            if return_documents {
                r["document"] = json!({"text": documents[i]});
            }
            r
        })
        .collect();
    Ok(input_response(
        json!({"id": super::complete::request_id("rerank"), "object": "list",
               "model": served.name(), "results": results}),
        input_tokens,
        audited,
    ))
}
