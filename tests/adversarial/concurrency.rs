//! Many users at once (issue 14): concurrent requests share the engine's work without changing
//! anyone's answer.

use std::time::Duration;

use super::common;
use super::harness::{call, eventually, metric, Server};

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
    s.stop();
}
