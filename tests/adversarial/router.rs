//! The HTTP edge over a fake generation backend, in process: the real router, handlers, engine
//! loop, token store and audit log, driven with `tower::ServiceExt::oneshot`, with a backend
//! that fails exactly as told. Each typed backend failure must reach the client as its own
//! status and code (no message text is matched on the way).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use http_body_util::BodyExt;
use tower::ServiceExt;

use securerun::server::engine::{
    Backend, Ended, Engine, EngineError, Outbox, Sequences, WorkerEvents,
};
use securerun::server::{self, models::ModelSpec, models::ServedModel, AppState};
use securerun::tokens::{Limits, Scope, TokenStore};
use securerun_models::{ChatMessage, FinishReason, Generation, GenerationParams, PrefixKey};

use super::common;

const MODEL: &str = "fake";

/// What the fake does with the next generation it is given.
#[derive(Clone)]
enum Plan {
    /// Emits these pieces, one per step, then ends (`cached` prompt tokens from its cache).
    Text {
        pieces: Vec<&'static str>,
        cached: usize,
    },
    /// The request's own fault, after `after` pieces.
    RequestError { after: usize },
    /// The worker dies after `after` pieces: every request in flight is lost.
    WorkerLost { after: usize },
    /// Never ends on its own (only a cancellation ends it).
    Stall,
    /// Ends as cancelled after `after` pieces though nobody asked (what the engine does when a
    /// job's deadline passes before its handler notices).
    EndsCancelled { after: usize },
}

struct Flight {
    plan: Plan,
    outbox: Outbox,
    prompt_tokens: usize,
    sent: Vec<&'static str>,
}

/// A generation backend that follows `plans` in order.
struct Fake {
    plans: Arc<Mutex<VecDeque<Plan>>>,
    flights: HashMap<u64, Flight>,
    next: u64,
    cancelled: Arc<Mutex<Vec<u64>>>,
}

fn generation(f: &Flight, cached: usize, finish_reason: FinishReason) -> Generation {
    Generation {
        text: f.sent.concat(),
        token_ids: vec![7; f.sent.len()],
        prompt_tokens: f.prompt_tokens,
        cached_tokens: cached,
        finish_reason,
        prefill_time: Duration::ZERO,
        decode_time: Duration::ZERO,
        logprobs: Vec::new(),
    }
}

impl Sequences for Fake {
    fn has_room(&self) -> bool {
        self.flights.len() < 4
    }
    fn in_flight(&self) -> usize {
        self.flights.len()
    }
    fn is_idle(&self) -> bool {
        self.flights.is_empty()
    }
    fn add(
        &mut self,
        prompt_ids: &[u32],
        _params: &GenerationParams,
        _prefix_key: Option<PrefixKey>,
        _deadline: Instant,
        outbox: Outbox,
    ) -> Result<u64, EngineError> {
        let plan = self.plans.lock().unwrap().pop_front().expect("a plan");
        self.next += 1;
        self.flights.insert(
            self.next,
            Flight {
                plan,
                outbox,
                prompt_tokens: prompt_ids.len(),
                sent: Vec::new(),
            },
        );
        Ok(self.next)
    }
    fn render(
        &mut self,
        _messages: &[ChatMessage],
        _tools: &[serde_json::Value],
        _deadline: Instant,
        done: tokio::sync::oneshot::Sender<Result<String, EngineError>>,
    ) -> Result<(), EngineError> {
        let _ = done.send(Ok("rendered".into()));
        Ok(())
    }
    fn cancel(&mut self, id: u64) -> Result<Option<Generation>, EngineError> {
        self.cancelled.lock().unwrap().push(id);
        Ok(self
            .flights
            .remove(&id)
            .map(|f| generation(&f, 0, FinishReason::Cancelled)))
    }
    fn step(&mut self) -> Result<Ended, EngineError> {
        std::thread::sleep(Duration::from_millis(2));
        let mut ended = Vec::new();
        for (&id, f) in self.flights.iter_mut() {
            let done = match &f.plan {
                Plan::Text { pieces, cached } => match pieces.get(f.sent.len()) {
                    Some(p) => {
                        f.outbox.push(p);
                        f.sent.push(p);
                        None
                    }
                    None => Some(Ok(generation(f, *cached, FinishReason::Length))),
                },
                Plan::EndsCancelled { after } if f.sent.len() == *after => {
                    Some(Ok(generation(f, 0, FinishReason::Cancelled)))
                }
                Plan::RequestError { after } if f.sent.len() == *after => Some(Err(
                    EngineError::Request("this input is refused by the model".into()),
                )),
                Plan::WorkerLost { after } if f.sent.len() == *after => {
                    self.flights.clear();
                    return Err(EngineError::Worker("the worker was killed".into()));
                }
                Plan::Stall => None,
                _ => {
                    f.outbox.push("x");
                    f.sent.push("x");
                    None
                }
            };
            if let Some(result) = done {
                ended.push((id, result));
            }
        }
        for (id, _) in &ended {
            self.flights.remove(id);
        }
        Ok(ended)
    }
    fn restarts(&self) -> WorkerEvents {
        WorkerEvents::default()
    }
}

/// A server state over the fake, with one inference token.
struct Edge {
    _state_dir: tempfile::TempDir,
    state: Arc<AppState>,
    token: String,
    /// A token for other models only.
    narrow: String,
    plans: Arc<Mutex<VecDeque<Plan>>>,
    cancelled: Arc<Mutex<Vec<u64>>>,
    runtime: tokio::runtime::Runtime,
}

impl Edge {
    fn new(config: server::config::ServeConfig) -> Edge {
        let state_dir = tempfile::tempdir().unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let audit = securerun::audit::AuditLog::open(
            &securerun::audit::audit_dir(state_dir.path()),
            securerun::audit::Durability::Buffered,
        )
        .unwrap();
        let store = TokenStore::new(state_dir.path());
        let token = store
            .create(
                "client",
                BTreeSet::from([Scope::Inference]),
                vec![],
                Limits::default(),
                None,
            )
            .unwrap()
            .token;
        let narrow = store
            .create(
                "narrow",
                BTreeSet::from([Scope::Inference]),
                vec!["elsewhere".into()],
                Limits::default(),
                None,
            )
            .unwrap()
            .token;
        let tokens = server::auth::TokenCache::new(store).unwrap();
        let plans = Arc::new(Mutex::new(VecDeque::new()));
        let cancelled = Arc::new(Mutex::new(Vec::new()));
        let fake = Fake {
            plans: plans.clone(),
            flights: HashMap::new(),
            next: 0,
            cancelled: cancelled.clone(),
        };
        let metrics = Arc::new(server::Metrics::default());
        let engine = Engine::start(
            MODEL.into(),
            Backend::Sequences(Box::new(fake)),
            config.queue,
            4,
            audit.clone(),
            metrics.clone(),
            runtime.handle().clone(),
        );
        // The tokenizer of a real model: prompts are counted and bounded by the server.
        let opts = securerun::OpenOptions {
            allow_unsigned: true,
            ..Default::default()
        };
        let source = securerun::open(&common::smollm2(), &opts)
            .unwrap()
            .source()
            .clone();
        let served = ServedModel {
            spec: ModelSpec {
                name: MODEL.into(),
                path: common::smollm2(),
                signature: None,
            },
            engine,
            encoder: Arc::new(securerun_models::PromptEncoder::load(&source).unwrap()),
            loaded_at: 0,
            version: 0,
            signer: None,
        };
        let state = Arc::new(AppState {
            lockdown: std::sync::atomic::AtomicBool::new(false),
            state_dir: state_dir.path().to_path_buf(),
            ledgers: server::ledger::Ledgers::new(audit.clone()),
            audit,
            models: server::models::ModelSet::new(vec![served]),
            starter: Arc::new(|_: &ModelSpec, _| Err(server::models::StartError::Panicked)),
            proxies: server::client::TrustedProxies::parse(&[]).unwrap(),
            shutdown: tokio::sync::watch::channel(false).0,
            background: tokio::sync::Mutex::new(()),
            reloads: tokio::sync::Mutex::new(()),
            recording_closed: Default::default(),
            started: 0,
            tokens,
            limiters: server::auth::Limiters::new(config.auth_failures_per_min),
            metrics,
            config: config.into(),
        });
        Edge {
            _state_dir: state_dir,
            state,
            token,
            narrow,
            plans,
            cancelled,
            runtime,
        }
    }

    /// One completion request through the router, as told by `plan`: status and body.
    fn complete(&self, plan: Plan, stream: bool) -> (u16, String) {
        self.plans.lock().unwrap().push_back(plan);
        let mut body = serde_json::json!({"model": MODEL, "prompt": "Hello there", "max_tokens": 8,
                                          "stream": stream});
        if stream {
            body["stream_options"] = serde_json::json!({"include_usage": true});
        }
        self.post("/v1/completions", &body)
    }

    /// One POST of `body` to `path` through the router: status and body.
    fn post(&self, path: &str, body: &serde_json::Value) -> (u16, String) {
        self.send("POST", path, &self.token, body.to_string())
    }

    /// One request through the router with `token`: status and body.
    fn send(&self, method: &str, path: &str, token: &str, body: String) -> (u16, String) {
        let (status, _, body) = self.send_with_headers(method, path, token, body);
        (status, body)
    }

    /// [`Edge::send`], with the response's headers.
    fn send_with_headers(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: String,
    ) -> (u16, axum::http::HeaderMap, String) {
        let mut req = axum::http::Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap();
        req.extensions_mut()
            .insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 40000))));
        let app = server::router(self.state.clone());
        self.runtime.block_on(async {
            let resp = app.oneshot(req).await.unwrap();
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let bytes = tokio::time::timeout(Duration::from_secs(20), resp.into_body().collect())
                .await
                .expect("the response ends")
                .unwrap()
                .to_bytes();
            (status, headers, String::from_utf8(bytes.to_vec()).unwrap())
        })
    }

    /// A request that must fail: its status and error code.
    fn failure(&self, plan: Plan) -> (u16, String) {
        let (status, body) = self.complete(plan, false);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let code = v["error"]["code"].as_str().unwrap_or_default();
        (status, code.to_string())
    }

    /// A streamed request's events, `[DONE]` (which must end them) left off.
    fn stream_events(&self, plan: Plan) -> Vec<String> {
        let (status, body) = self.complete(plan, true);
        assert_eq!(status, 200, "{body}");
        let mut events: Vec<String> = body
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(str::to_string)
            .collect();
        assert_eq!(events.pop().as_deref(), Some("[DONE]"), "{body}");
        events
    }

    /// A streamed request's last event before `[DONE]`.
    fn stream_end(&self, plan: Plan) -> String {
        self.stream_events(plan)
            .pop()
            .expect("an event before [DONE]")
    }
}

#[test]
fn the_backend_s_pieces_and_counts_reach_the_client_as_sent() {
    let edge = Edge::new(Default::default());
    let plan = Plan::Text {
        pieces: vec!["Hel", "lo ", "wörld"],
        cached: 2,
    };
    let (status, body) = edge.complete(plan.clone(), false);
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["choices"][0]["text"], "Hello wörld");
    assert_eq!(v["usage"]["completion_tokens"], 3);
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 2);
    // Streamed: the same pieces in order, the usage chunk, then [DONE].
    let data = edge.stream_events(plan);
    let text: String = data
        .iter()
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .filter_map(|v| v["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(text, "Hello wörld");
    let usage = data.last().expect("a usage chunk");
    assert!(usage.contains("\"cached_tokens\":2"), "{usage}");
}

#[test]
fn each_typed_backend_failure_has_its_own_status_and_code() {
    let edge = Edge::new(Default::default());
    let failure = |plan| edge.failure(plan);
    let code = |status: u16, code: &str| (status, code.to_string());
    assert_eq!(
        failure(Plan::RequestError { after: 0 }),
        code(400, "invalid_request")
    );
    assert_eq!(
        failure(Plan::WorkerLost { after: 0 }),
        code(503, "worker_failed")
    );
    // Mid-stream, the failure is the stream's last event before [DONE], never a silent end.
    let end = edge.stream_end(Plan::WorkerLost { after: 2 });
    assert!(end.contains("worker_failed"), "{end}");
    // A generation the engine ended on its own (its deadline) is a timeout, never a short
    // completion with finish_reason "stop", streamed or not.
    assert_eq!(
        failure(Plan::EndsCancelled { after: 2 }),
        code(504, "timeout")
    );
    let end = edge.stream_end(Plan::EndsCancelled { after: 2 });
    assert!(end.contains("\"timeout\""), "{end}");
    // The engine goes on after a lost worker.
    let (status, _) = edge.complete(
        Plan::Text {
            pieces: vec!["ok"],
            cached: 0,
        },
        false,
    );
    assert_eq!(status, 200);
}

#[test]
fn a_backend_that_never_ends_is_cancelled_at_the_deadline() {
    let config = server::config::ServeConfig {
        generation_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    let edge = Edge::new(config);
    let started = Instant::now();
    assert_eq!(edge.failure(Plan::Stall), (504, "timeout".to_string()));
    assert!(started.elapsed() < Duration::from_secs(10));
    // The backend was told to stop: its slot is free again.
    let deadline = Instant::now() + Duration::from_secs(5);
    while edge.cancelled.lock().unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the stalled generation was never cancelled"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// No field is silently ignored: each feature not implemented here, and any unknown field, is
/// a 400 in OpenAI's shape naming the field in `param`, before any work; the same features in
/// their neutral form, and caller metadata, are accepted. Before, `response_format`, `tools`,
/// `logprobs` and the rest were accepted and dropped (a client asking for JSON got prose).
#[test]
fn every_field_is_implemented_or_refused_by_name() {
    let edge = Edge::new(Default::default());
    let chat = |extra: serde_json::Value| {
        let mut body = serde_json::json!({"model": MODEL, "max_tokens": 4,
            "messages": [{"role": "user", "content": "Hi"}]});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    for (path, body, param) in [
        (
            "/v1/chat/completions",
            chat(serde_json::json!({"response_format": {"type": "json_schema"}})),
            "response_format.json_schema",
        ),
        (
            "/v1/chat/completions",
            chat(serde_json::json!({"response_format": {"type": "yaml"}})),
            "response_format.type",
        ),
        (
            "/v1/chat/completions",
            chat(
                serde_json::json!({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}),
            ),
            "tools[0].function.name",
        ),
        (
            "/v1/chat/completions",
            chat(
                serde_json::json!({"tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}}}),
            ),
            "tool_choice",
        ),
        (
            "/v1/chat/completions",
            chat(
                serde_json::json!({"messages": [{"role": "assistant", "content": null,
                "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]}),
            ),
            "messages[0].tool_calls[0].function.arguments",
        ),
        (
            "/v1/chat/completions",
            chat(serde_json::json!({"logprobs": true, "top_logprobs": 21})),
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            chat(serde_json::json!({"logit_bias": {"not-a-token": -100}})),
            "logit_bias",
        ),
        (
            "/v1/chat/completions",
            chat(serde_json::json!({"logit_bias": {"+44": -100}})),
            "logit_bias",
        ),
        (
            "/v1/chat/completions",
            chat(serde_json::json!({"temperature": 3})),
            "temperature",
        ),
        (
            "/v1/chat/completions",
            chat(serde_json::json!({"seed": -1})),
            "seed",
        ),
        (
            "/v1/chat/completions",
            chat(serde_json::json!({"messages": [{"role": 7, "content": "x"}]})),
            "messages[0].role",
        ),
        (
            "/v1/chat/completions",
            chat(serde_json::json!({"top_p": 5})),
            "top_p",
        ),
        (
            "/v1/chat/completions",
            chat(serde_json::json!({"stream_options": {"include_usage": true}})),
            "stream_options",
        ),
        (
            "/v1/chat/completions",
            chat(serde_json::json!({"max_tokens": 0})),
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            chat(serde_json::json!({"messages": [{"role": "user",
                "content": [{"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}}]}]})),
            "messages[0].content[0].cache_control",
        ),
        (
            "/v1/chat/completions",
            chat(
                serde_json::json!({"tools": [{"type": "function", "function": {"name": "say",
                "parameters": {"type": "string"}}}]}),
            ),
            "tools[0].function.parameters",
        ),
        (
            "/v1/chat/completions",
            chat(
                serde_json::json!({"tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "f"}, "x": 1}}),
            ),
            "tool_choice",
        ),
        (
            "/v1/chat/completions",
            chat(serde_json::json!({"response_format": {"type": "json_object"}, "stop": ["}"]})),
            "stop",
        ),
        (
            "/v1/chat/completions",
            chat(
                serde_json::json!({"response_format": {"type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "integer", "multipleOf": -3}}}}),
            ),
            "response_format",
        ),
        (
            "/v1/chat/completions",
            chat(serde_json::json!({"n": 2})),
            "n",
        ),
        (
            "/v1/chat/completions",
            chat(serde_json::json!({"presence_penalty": 2.5})),
            "presence_penalty",
        ),
        (
            "/v1/chat/completions",
            chat(serde_json::json!({"max_tokenz": 5})),
            "max_tokenz",
        ),
        (
            "/v1/completions",
            serde_json::json!({"model": MODEL, "prompt": "x", "echo": true}),
            "echo",
        ),
    ] {
        let (status, out) = edge.post(path, &body);
        assert_eq!(status, 400, "{param}: {out}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["error"]["param"], param, "{out}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{out}");
    }
    // Neutral forms and caller metadata ask for nothing: served.
    edge.plans.lock().unwrap().push_back(Plan::Text {
        pieces: vec!["ok"],
        cached: 0,
    });
    let (status, out) = edge.post(
        "/v1/chat/completions",
        &chat(
            serde_json::json!({"response_format": {"type": "text"}, "tools": [],
            "tool_choice": "none", "logprobs": false, "logit_bias": {}, "user": "u-17",
            "parallel_tool_calls": true, "n": 1, "frequency_penalty": 0}),
        ),
    );
    assert_eq!(status, 200, "{out}");
}

/// `GET /v1/models/{id}`: the model if the token may use it; a model it may not use is the same
/// 404 as one that does not exist (OpenAI's shape, `param: model`), so a token learns no other
/// model's name. Before, the route did not exist (404 `not_found` for every id).
#[test]
fn one_model_is_retrieved_only_by_a_token_that_may_use_it() {
    let edge = Edge::new(Default::default());
    let (status, out) = edge.send("GET", "/v1/models/fake", &edge.token, String::new());
    assert_eq!(status, 200, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["id"].as_str(), v["object"].as_str()),
        (Some(MODEL), Some("model"))
    );
    for (id, token) in [("fake", &edge.narrow), ("absent", &edge.token)] {
        let (status, out) = edge.send("GET", &format!("/v1/models/{id}"), token, String::new());
        assert_eq!(status, 404, "{out}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["error"]["code"], "model_not_found", "{out}");
        assert_eq!(v["error"]["param"], "model", "{out}");
    }
    // Listing agrees: the narrow token sees no model here.
    let (_, out) = edge.send("GET", "/v1/models", &edge.narrow, String::new());
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["data"].as_array().map(Vec::len), Some(0), "{out}");
}

/// Message content as text parts is served as the parts joined by newlines (the same prompt,
/// token for token, as that string); a part of another type, a field this server does not
/// implement and a role it does not know are 400s naming `messages[i]...`. Before, parts were
/// a 400 for every client that sends them, and `name` was silently dropped.
#[test]
fn message_parts_are_text_or_refused_by_name() {
    let edge = Edge::new(Default::default());
    let chat = |message: serde_json::Value| serde_json::json!({"model": MODEL, "max_tokens": 2, "messages": [message]});
    let prompt_tokens = |message: serde_json::Value| {
        edge.plans.lock().unwrap().push_back(Plan::Text {
            pieces: vec!["ok"],
            cached: 0,
        });
        let (status, out) = edge.post("/v1/chat/completions", &chat(message));
        assert_eq!(status, 200, "{out}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["usage"]["prompt_tokens"].as_u64().unwrap()
    };
    let parts = prompt_tokens(serde_json::json!({"role": "user", "content": [
        {"type": "text", "text": "First line"}, {"type": "text", "text": "second line"}]}));
    let joined = prompt_tokens(serde_json::json!({"role": "user",
        "content": "First line\nsecond line"}));
    assert_eq!(parts, joined);
    // `developer` is the system role; neutral fields pass.
    prompt_tokens(
        serde_json::json!({"role": "developer", "content": "Be brief.",
        "name": null, "tool_calls": []}),
    );
    for (message, param) in [
        (
            serde_json::json!({"role": "user", "content": [{"type": "text", "text": "a"},
                {"type": "image_url", "image_url": {"url": "data:,"}}]}),
            "messages[0].content[1].type",
        ),
        (
            serde_json::json!({"role": "user", "content": "hi", "name": "mallory"}),
            "messages[0].name",
        ),
        (
            serde_json::json!({"role": "tool", "content": "42"}),
            "messages[0].tool_call_id",
        ),
        (
            serde_json::json!({"role": "user", "content": "hi", "tool_call_id": "c1"}),
            "messages[0].tool_call_id",
        ),
        (
            serde_json::json!({"role": "robot", "content": "hi"}),
            "messages[0].role",
        ),
        (serde_json::json!({"role": "user"}), "messages[0].content"),
    ] {
        let (status, out) = edge.post("/v1/chat/completions", &chat(message));
        assert_eq!(status, 400, "{out}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["error"]["param"], param, "{out}");
    }
}

/// Every 503 says when to retry: a lost worker (`worker_failed`) now carries `Retry-After` like
/// the overload and lockdown refusals always did. Before, it had none.
#[test]
fn a_lost_worker_s_503_says_when_to_retry() {
    let edge = Edge::new(Default::default());
    edge.plans
        .lock()
        .unwrap()
        .push_back(Plan::WorkerLost { after: 0 });
    let body = serde_json::json!({"model": MODEL, "prompt": "Hello there", "max_tokens": 8});
    let (status, headers, out) =
        edge.send_with_headers("POST", "/v1/completions", &edge.token, body.to_string());
    assert_eq!(status, 503, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["error"]["code"], "worker_failed", "{out}");
    let after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(after >= 1, "{after}");
}

/// A completion request may carry several prompts (strings or token-id lists): each is its own
/// sequence and its own choice, in order, with the usage summed. Several prompts are never
/// streamed, more than the limit are refused by name, and one prompt's failure fails the request
/// and stops the others (none is answered half). Before, any list of two prompts was a 400.
#[test]
fn several_prompts_are_answered_as_choices_in_order() {
    let edge = Edge::new(Default::default());
    let text = |pieces| Plan::Text { pieces, cached: 0 };
    {
        let mut plans = edge.plans.lock().unwrap();
        plans.push_back(text(vec!["one"]));
        plans.push_back(text(vec!["two", " more"]));
        plans.push_back(text(vec!["three"]));
    }
    let (status, body) = edge.post(
        "/v1/completions",
        &serde_json::json!({"model": MODEL, "max_tokens": 8,
                            "prompt": ["Hello there", "Good morning", "Hi"]}),
    );
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let choices = v["choices"].as_array().unwrap();
    let got: Vec<(u64, &str)> = choices
        .iter()
        .map(|c| (c["index"].as_u64().unwrap(), c["text"].as_str().unwrap()))
        .collect();
    assert_eq!(got, [(0, "one"), (1, "two more"), (2, "three")]);
    assert_eq!(v["usage"]["completion_tokens"], 4);
    // Token-id lists too.
    {
        let mut plans = edge.plans.lock().unwrap();
        plans.push_back(text(vec!["a"]));
        plans.push_back(text(vec!["b"]));
    }
    let (status, body) = edge.post(
        "/v1/completions",
        &serde_json::json!({"model": MODEL, "max_tokens": 8, "prompt": [[504, 3575], [282]]}),
    );
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], 3, "{body}");
    // Refused by name, before any work: streamed, too many, or of mixed bad shapes.
    let param = |body: serde_json::Value| {
        let (status, text) = edge.post("/v1/completions", &body);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        (
            status,
            v["error"]["param"].as_str().unwrap_or("").to_string(),
        )
    };
    assert_eq!(
        param(serde_json::json!({"model": MODEL, "prompt": ["a", "b"], "stream": true})),
        (400, "stream".into())
    );
    let many: Vec<String> = (0..9).map(|i| format!("prompt {i}")).collect();
    assert_eq!(
        param(serde_json::json!({"model": MODEL, "prompt": many})),
        (400, "prompt".into())
    );
    assert_eq!(
        param(serde_json::json!({"model": MODEL, "prompt": ["a", 7]})),
        (400, "prompt".into())
    );
    assert_eq!(edge.plans.lock().unwrap().len(), 0, "no work was started");
    // One prompt's failure is the request's; the other generation is stopped.
    {
        let mut plans = edge.plans.lock().unwrap();
        plans.push_back(Plan::Stall);
        plans.push_back(Plan::RequestError { after: 0 });
    }
    let before = edge.cancelled.lock().unwrap().len();
    let (status, body) = edge.post(
        "/v1/completions",
        &serde_json::json!({"model": MODEL, "max_tokens": 8, "prompt": ["x", "y"]}),
    );
    // The second prompt's error is the answer at once, though the first never ends.
    assert_eq!(status, 400, "{body}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while edge.cancelled.lock().unwrap().len() == before {
        assert!(
            Instant::now() < deadline,
            "the stalled prompt was never stopped"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// CORS: only configured origins get CORS headers; preflights are answered before
/// authentication and never count as failed authentications (a browser's preflights cannot
/// lock its client out); nothing is allowed by default, and a wildcard is refused at start.
#[test]
fn cors_allows_only_configured_origins_and_preflights_are_not_auth_failures() {
    let allowed = "https://app.example.org";
    let config = server::config::ServeConfig {
        cors_allowed_origins: vec![allowed.into()],
        ..Default::default()
    };
    let edge = Edge::new(config);
    let send = |edge: &Edge, method: &str, origin: &str, token: Option<&str>| {
        let mut req = axum::http::Request::builder()
            .method(method)
            .uri("/v1/chat/completions")
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type",
            );
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let mut req = req.body(Body::empty()).unwrap();
        req.extensions_mut()
            .insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 40001))));
        let app = server::router(edge.state.clone());
        edge.runtime.block_on(async {
            let resp = app.oneshot(req).await.unwrap();
            (
                resp.status().as_u16(),
                resp.headers()
                    .get("access-control-allow-origin")
                    .map(|v| v.to_str().unwrap().to_string()),
            )
        })
    };
    let unauthorized = |edge: &Edge| {
        edge.state
            .metrics
            .unauthorized
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    // Many preflights: all answered for the allowed origin, none an authentication failure.
    for _ in 0..40 {
        let (status, allow) = send(&edge, "OPTIONS", allowed, None);
        assert_eq!((status, allow.as_deref()), (200, Some(allowed)));
    }
    assert_eq!(unauthorized(&edge), 0);
    // Another origin's preflight gets no permission.
    let (_, allow) = send(&edge, "OPTIONS", "https://evil.example", None);
    assert_eq!(allow, None);
    // Real requests from the allowed origin carry the header, refusals included (so the page
    // can read the error); the client is not locked out by the preflights above.
    let (status, allow) = send(&edge, "POST", allowed, Some("sr_wrong"));
    assert_eq!((status, allow.as_deref()), (401, Some(allowed)));
    assert_eq!(unauthorized(&edge), 1);

    // Nothing by default.
    let plain = Edge::new(Default::default());
    let (_, allow) = send(&plain, "OPTIONS", allowed, None);
    assert_eq!(allow, None);
    let (_, allow) = send(&plain, "POST", allowed, Some("sr_wrong"));
    assert_eq!(allow, None);

    for bad in [
        "*",
        "https://app.example.org/",
        "app.example.org",
        "https://a.org/x",
    ] {
        let config = server::config::ServeConfig {
            cors_allowed_origins: vec![bad.into()],
            ..Default::default()
        };
        assert!(config.validate().is_err(), "{bad} accepted");
    }
}
