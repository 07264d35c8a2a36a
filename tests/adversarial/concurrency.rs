//! Many users at once (issue 14): concurrent requests share the engine's work without changing
//! anyone's answer.

use std::time::Duration;

use super::common;
use super::harness::{call, eventually, metric, model_metric, Server};

/// Concurrent embedding requests are joined into one call (each weight read serves them all),
/// and every client still gets exactly the vectors it gets alone.
#[test]
fn concurrent_embedding_requests_are_batched_and_each_gets_its_own_vectors() {
    let state = tempfile::tempdir().unwrap();
    let s = Server::start(&common::minilm(), state.path(), "queue = 64\n", &[]);
    let t = s.token(
        "e",
        &["--scopes", "embeddings,metrics", "--rate", "1000/min"],
    );
    let inputs: Vec<String> = (0..16)
        .map(|i| {
            format!(
                "sentence number {i} about {}",
                "rivers and towns ".repeat(i % 5 + 1)
            )
        })
        .collect();
    let body = |text: &str| {
        serde_json::json!({"model": "all-minilm-l6-v2", "input": text, "encoding_format": "float"})
            .to_string()
    };
    let vector = |out: &str| -> Vec<f64> {
        let v: serde_json::Value = serde_json::from_str(out).unwrap();
        v["data"][0]["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let alone: Vec<Vec<f64>> = inputs
        .iter()
        .map(|text| {
            let (status, out) = call(s.addr, "POST", "/v1/embeddings", Some(&t), &body(text));
            assert_eq!(status, 200, "{out}");
            vector(&out)
        })
        .collect();
    assert_eq!(metric(s.addr, &t, "embedding_batches_total"), 0);
    // All at once, a few rounds (the first request of a round runs alone while the others
    // queue behind it; those are then joined).
    let batched = eventually(Duration::from_secs(60), || {
        let together: Vec<(u16, String)> = std::thread::scope(|scope| {
            let handles: Vec<_> = inputs
                .iter()
                .map(|text| {
                    let (addr, t, b) = (s.addr, &t, body(text));
                    scope.spawn(move || call(addr, "POST", "/v1/embeddings", Some(t), &b))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (i, (status, out)) in together.iter().enumerate() {
            assert_eq!(*status, 200, "{out}");
            assert_eq!(vector(out), alone[i], "request {i} got another vector");
        }
        metric(s.addr, &t, "embedding_batches_total") > 0
    });
    assert!(batched, "concurrent requests were never joined");
    s.stop();
}

/// Concurrent generations advance together in one forward pass per step (in-process model),
/// and each client gets exactly the completion it gets alone, streamed or not.
#[test]
fn concurrent_generations_are_batched_and_each_gets_its_own_completion() {
    generations_are_batched(&["--allow-unsigned", "--sandbox", "off"]);
}

/// The same through the confined worker (the default): several requests in flight on one
/// worker channel, batched by the worker, each checked by the supervisor on its own.
#[test]
fn concurrent_generations_in_the_confined_worker_are_batched_and_each_gets_its_own_completion() {
    generations_are_batched(&["--allow-unsigned"]);
}

fn generations_are_batched(args: &[&str]) {
    use super::harness::completion;
    let state = tempfile::tempdir().unwrap();
    let s = Server::start_with(
        &common::smollm2(),
        state.path(),
        "queue = 64\nmax_sequences = 4\n",
        &[],
        args,
    );
    let t = s.token(
        "g",
        &["--scopes", "inference,metrics", "--rate", "1000/min"],
    );
    let prompts = [
        "The capital of France is",
        "Once upon a time, in a small village,",
        "1, 2, 3, 4,",
        "The best way to learn a language is",
    ];
    let text_of = |stream: bool, out: &str| -> String {
        if !stream {
            let v: serde_json::Value = serde_json::from_str(out).unwrap();
            return v["choices"][0]["text"].as_str().unwrap().to_string();
        }
        out.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
            .filter_map(|v| v["choices"][0]["text"].as_str().map(str::to_string))
            .collect()
    };
    let alone: Vec<String> = prompts
        .iter()
        .map(|p| {
            let (status, out) = call(
                s.addr,
                "POST",
                "/v1/completions",
                Some(&t),
                &completion(p, 16, false),
            );
            assert_eq!(status, 200, "{out}");
            text_of(false, &out)
        })
        .collect();
    let batched = eventually(Duration::from_secs(120), || {
        let together: Vec<(bool, u16, String)> = std::thread::scope(|scope| {
            let handles: Vec<_> = prompts
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let (addr, t, stream) = (s.addr, &t, i % 2 == 1);
                    let body = completion(p, 16, stream);
                    scope.spawn(move || {
                        let (status, out) = call(addr, "POST", "/v1/completions", Some(t), &body);
                        (stream, status, out)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (i, (stream, status, out)) in together.iter().enumerate() {
            assert_eq!(*status, 200, "{out}");
            assert_eq!(
                text_of(*stream, out),
                alone[i],
                "request {i} (stream {stream})"
            );
        }
        metric(s.addr, &t, "batch_sequences_peak") >= 2
    });
    assert!(batched, "concurrent generations never shared a step");
    // The engine's own numbers, per model, in a well-formed exposition.
    let (status, body) = call(s.addr, "GET", "/metrics", Some(&t), "");
    assert_eq!(status, 200);
    check_exposition(&body);
    let value = |series: &str| -> f64 {
        body.lines()
            .find_map(|l| l.strip_prefix(series))
            .unwrap_or_else(|| panic!("no {series} in {body}"))
            .trim()
            .parse()
            .unwrap()
    };
    let model = format!("{{model=\"{}\"}} ", super::harness::SMOL);
    assert!(
        value(&format!(
            "securerun_time_to_first_token_seconds_count{model}"
        )) >= 8.0
    );
    assert!(
        value(&format!(
            "securerun_inter_token_latency_seconds_count{model}"
        )) >= 8.0
    );
    assert!(value(&format!("securerun_model_generated_tokens_total{model}")) >= 8.0);
    assert!(value(&format!("securerun_model_prompt_tokens_total{model}")) >= 8.0);
    let one = format!(
        "securerun_batch_size_bucket{{model=\"{}\",le=\"1\"}} ",
        super::harness::SMOL
    );
    assert!(
        value(&one) < value(&format!("securerun_batch_size_count{model}")),
        "some steps advanced several sequences"
    );
    s.stop();
}

/// What `promtool check metrics` checks first: every sample belongs to a family declared with
/// HELP and TYPE before it, each family declared once, histogram buckets cumulative and ending
/// in +Inf equal to the count.
fn check_exposition(body: &str) {
    let mut types = std::collections::HashMap::new();
    let mut helped = std::collections::HashSet::new();
    let mut last_bucket: std::collections::HashMap<String, f64> = Default::default();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split_whitespace().next().unwrap();
            assert!(helped.insert(name.to_string()), "HELP twice for {name}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (name, kind) = (it.next().unwrap(), it.next().unwrap());
            assert!(helped.contains(name), "TYPE before HELP for {name}");
            assert!(types.insert(name.to_string(), kind.to_string()).is_none());
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("{line}"));
        let name = series.split('{').next().unwrap();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).is_some_and(|k| k == "histogram"))
            })
            .unwrap_or(name);
        assert!(types.contains_key(family), "{name} has no TYPE");
        if name.ends_with("_bucket") {
            let labels = series.split("le=").next().unwrap().to_string();
            let before = last_bucket.insert(labels, value).unwrap_or(0.0);
            assert!(value >= before, "buckets not cumulative: {line}");
        }
        if name.ends_with("_count") && types.get(family).is_some_and(|k| k == "histogram") {
            let inf = series
                .replace("_count{", "_bucket{")
                .replace('}', ",le=\"+Inf\"}");
            assert!(
                body.contains(&format!("{inf} {value}")),
                "{line}: +Inf bucket differs"
            );
        }
    }
}

/// A streaming client that leaves while its long prompt is still being fed frees its slot
/// within a couple of seconds: keep-alives find the closed connection, and the worker stops
/// at its next step. Before, nothing was sent during the prefill, so the departure went
/// unnoticed until the whole prompt had run (found by an attack helper: 20 s per request).
#[test]
fn a_stream_left_during_its_prefill_frees_its_slot() {
    use super::harness::{completion, send};
    let state = tempfile::tempdir().unwrap();
    let s = Server::start(
        &common::smollm2(),
        state.path(),
        "max_sequences = 1\nqueue = 8\n",
        &[],
    );
    let t = s.token("g", &["--scopes", "inference", "--rate", "1000/min"]);
    let long = completion(&"hello world ".repeat(1400), 4, true);
    let leaver = send(s.addr, "POST", "/v1/completions", Some(&t), &long);
    std::thread::sleep(Duration::from_millis(1500));
    drop(leaver);
    let started = std::time::Instant::now();
    let (status, out) = call(
        s.addr,
        "POST",
        "/v1/completions",
        Some(&t),
        &completion("Hi", 2, false),
    );
    assert_eq!(status, 200, "{out}");
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(8),
        "the next request waited {waited:?} for a prefill nobody wanted"
    );
    s.stop();
}

/// A prompt prefix computed for one token's request is reused by that token's next request
/// (reported as OpenAI's `prompt_tokens_details.cached_tokens`, counted in the metrics) and
/// changes nothing in its answer; another token's identical request computes it afresh, so its
/// timing tells nothing about what others asked.
#[test]
fn a_prompt_prefix_is_reused_only_for_the_token_that_computed_it() {
    use super::harness::completion;
    let state = tempfile::tempdir().unwrap();
    let s = Server::start_with(
        &common::smollm2(),
        state.path(),
        "max_sequences = 2\n",
        &[],
        &["--allow-unsigned"],
    );
    let a = s.token("a", &["--scopes", "inference,metrics"]);
    let b = s.token("b", &["--scopes", "inference"]);
    let system = "You are a careful assistant for a hospital's records team. Answer briefly. ";
    let ask = |token: &str, question: &str| -> (String, u64, u64) {
        let body = completion(&format!("{system}{question}"), 8, false);
        let (status, out) = call(s.addr, "POST", "/v1/completions", Some(token), &body);
        assert_eq!(status, 200, "{out}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let usage = &v["usage"];
        (
            v["choices"][0]["text"].as_str().unwrap().to_string(),
            usage["prompt_tokens"].as_u64().unwrap(),
            usage["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap(),
        )
    };
    let (first, prompt, cached) = ask(&a, "What is a discharge summary?");
    assert_eq!(cached, 0, "nothing was cached yet");
    // The same token, the same system prompt, another question: the shared prefix is reused.
    let (_, _, cached) = ask(&a, "What is an admission note?");
    assert!(
        cached >= 10,
        "the system prompt was computed again ({cached})"
    );
    // The same request again: all but the last prompt token reused, the same answer.
    let (again, _, cached) = ask(&a, "What is a discharge summary?");
    assert_eq!(cached, prompt - 1);
    assert_eq!(again, first, "a reused prefix changed the answer");
    // Another token asking exactly the same computes everything and gets the same answer.
    let (other, _, cached) = ask(&b, "What is a discharge summary?");
    assert_eq!(cached, 0, "token b was served token a's cached prefix");
    assert_eq!(other, first);
    let counted = model_metric(s.addr, &a, "model_prompt_cached_tokens_total");
    assert!(counted >= prompt - 1 + 10, "{counted}");
    s.stop();
}
