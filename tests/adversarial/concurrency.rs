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
