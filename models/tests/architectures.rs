//! Every supported architecture loads from generated weights and decodes, and its KV cache gives
//! the same tokens as recomputing the whole sequence; f16 and bf16 weights load too.

mod common;

use std::ops::ControlFlow;
use std::sync::Arc;

use candle_core::DType;
use securerun_models::{
    Embedder, GenerationParams, LoadOptions, ModelSource, Prompt, SamplingParams, TextModel,
};

fn load(dir: &std::path::Path) -> TextModel {
    load_on(dir, securerun_models::load::Engine::Best)
}

fn load_on(dir: &std::path::Path, engine: securerun_models::load::Engine) -> TextModel {
    load_at(dir, engine, securerun_models::Precision::Auto)
}

fn load_at(
    dir: &std::path::Path,
    engine: securerun_models::load::Engine,
    precision: securerun_models::Precision,
) -> TextModel {
    let opts = LoadOptions {
        engine,
        precision,
        ..Default::default()
    };
    let source = Arc::new(ModelSource::open(dir, &opts.limits).unwrap());
    TextModel::load(&source, &opts).unwrap()
}

fn greedy(n: usize) -> GenerationParams {
    GenerationParams {
        max_tokens: n,
        ignore_eos: true,
        ..Default::default()
    }
}

fn check_cache_consistency(arch: &str, dtype: DType) {
    let tmp = tempfile::tempdir().unwrap();
    common::write_model(tmp.path(), arch, dtype);
    let mut model = load(tmp.path());
    let prompt = model
        .prompt_ids(&Prompt::Text("hello world".into()))
        .unwrap();
    let out = model
        .generate_from_ids(&prompt, &greedy(8), &mut |_| ControlFlow::Continue(()))
        .unwrap();
    assert_eq!(out.token_ids.len(), 8, "{arch}");
    // Without a cache: each next token from a fresh prefill of the whole sequence so far.
    let mut seq = prompt.clone();
    for (i, &expected) in out.token_ids.iter().enumerate() {
        let step = model
            .generate_from_ids(&seq, &greedy(1), &mut |_| ControlFlow::Continue(()))
            .unwrap();
        assert_eq!(
            step.token_ids,
            vec![expected],
            "{arch} {dtype:?}: token {i} differs without KV cache"
        );
        seq.push(expected);
    }
    // Deterministic across runs.
    let again = model
        .generate_from_ids(&prompt, &greedy(8), &mut |_| ControlFlow::Continue(()))
        .unwrap();
    assert_eq!(again.token_ids, out.token_ids, "{arch}");
}

#[test]
fn llama_f32() {
    check_cache_consistency("llama", DType::F32);
}

#[test]
fn llama_f16_and_bf16_weights() {
    check_cache_consistency("llama", DType::F16);
    check_cache_consistency("llama", DType::BF16);
}

#[test]
fn mistral() {
    check_cache_consistency("mistral", DType::F32);
}

#[test]
fn qwen2() {
    check_cache_consistency("qwen2", DType::BF16);
}

#[test]
fn qwen3() {
    check_cache_consistency("qwen3", DType::F32);
}

#[test]
fn phi3() {
    check_cache_consistency("phi3", DType::F16);
}

#[test]
fn gemma2() {
    check_cache_consistency("gemma2", DType::F32);
}

#[test]
fn bert_embeddings_are_normalized_and_padding_invariant() {
    let tmp = tempfile::tempdir().unwrap();
    common::write_model(tmp.path(), "bert", DType::F32);
    let opts = LoadOptions::default();
    let source = Arc::new(ModelSource::open(tmp.path(), &opts.limits).unwrap());
    let e = Embedder::load(&source, &opts).unwrap();
    assert_eq!(e.dimension(), 32);
    let texts = vec![
        "short".to_string(),
        "a much longer input text here".to_string(),
    ];
    let batch = e.embed(&texts).unwrap();
    for v in &batch {
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
    }
    // Padding inside a batch must not change a vector.
    let alone = e.embed(&texts[..1]).unwrap();
    let diff: f32 = alone[0]
        .iter()
        .zip(&batch[0])
        .map(|(a, b)| (a - b).abs())
        .sum();
    assert!(diff < 1e-4, "padding changed the embedding by {diff}");
    // Over-long input is an error, not a silent truncation.
    let long = vec!["x".repeat(500)];
    assert!(matches!(
        e.embed(&long),
        Err(securerun_models::EmbedError::InputTooLong { index: 0, .. })
    ));
}

/// The own BERT encoder against candle-transformers (the reference) on the same generated
/// model, at f32: every vector of a batch of different lengths (the reference pads, the own
/// encoder packs), elementwise.
#[test]
fn the_own_encoder_matches_the_reference() {
    use securerun_models::load::Engine;
    let tmp = tempfile::tempdir().unwrap();
    common::write_model(tmp.path(), "bert", DType::F32);
    let source = Arc::new(ModelSource::open(tmp.path(), &LoadOptions::default().limits).unwrap());
    let load = |engine| {
        Embedder::load(
            &source,
            &LoadOptions {
                engine,
                ..Default::default()
            },
        )
        .unwrap()
    };
    let (own, reference) = (load(Engine::Best), load(Engine::Reference));
    let texts: Vec<String> = [
        "a",
        "short one",
        "a much longer input text than the others here",
    ]
    .iter()
    .map(|t| t.to_string())
    .collect();
    let (a, b) = (own.embed(&texts).unwrap(), reference.embed(&texts).unwrap());
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let worst = x
            .iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-4, "input {i}: differs by {worst}");
    }
}

#[test]
fn chat_stop_strings_cancel_and_limits() {
    let tmp = tempfile::tempdir().unwrap();
    common::write_model(tmp.path(), "llama", DType::F32);
    let mut model = load(tmp.path());
    let chat = Prompt::Chat(vec![securerun_models::ChatMessage::new("user", "hi")]);
    let ids = model.prompt_ids(&chat).unwrap();
    // ChatML specials are single tokens: <|im_start|> = 2.
    assert_eq!(ids[0], 2);

    // Cancellation from the callback stops at once.
    let mut calls = 0;
    let out = model
        .generate(&Prompt::Text("abc".into()), &greedy(50), &mut |_| {
            calls += 1;
            ControlFlow::Break(())
        })
        .unwrap();
    assert_eq!(out.finish_reason, securerun_models::FinishReason::Cancelled);
    assert_eq!(calls, 1);

    // Streamed pieces concatenate to the final text.
    let mut streamed = String::new();
    let full = model
        .generate(&Prompt::Text("abc".into()), &greedy(20), &mut |p| {
            streamed.push_str(p);
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(streamed, full.text);

    // A stop string taken from the greedy text ends generation before it.
    if full.text.chars().count() > 4 {
        let stop: String = full.text.chars().skip(2).take(2).collect();
        let mut params = greedy(20);
        params.stop = vec![stop.clone()];
        let out = model
            .generate(&Prompt::Text("abc".into()), &params, &mut |_| {
                ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(out.finish_reason, securerun_models::FinishReason::Stop);
        assert!(!out.text.contains(&stop));
        assert!(full.text.starts_with(&out.text));
    }

    // The context limit (128) is enforced.
    let long = vec![5u32; 200];
    assert!(matches!(
        model.generate_from_ids(&long, &greedy(4), &mut |_| ControlFlow::Continue(())),
        Err(securerun_models::GenerateError::PromptTooLong {
            prompt_tokens: 200,
            max_context: 128
        })
    ));
    // Bad sampling parameters are refused up front.
    let mut bad = greedy(4);
    bad.sampling = SamplingParams {
        top_p: Some(1.5),
        temperature: 1.0,
        ..Default::default()
    };
    assert!(matches!(
        model.generate(&Prompt::Text("a".into()), &bad, &mut |_| {
            ControlFlow::Continue(())
        }),
        Err(securerun_models::GenerateError::Params(_))
    ));
}

#[test]
fn seeded_sampling_is_reproducible() {
    let tmp = tempfile::tempdir().unwrap();
    common::write_model(tmp.path(), "llama", DType::F32);
    let mut model = load(tmp.path());
    let mut params = greedy(16);
    params.sampling = SamplingParams {
        temperature: 1.5,
        top_k: Some(50),
        top_p: Some(0.95),
        repetition_penalty: 1.1,
        seed: 42,
        ..Default::default()
    };
    let p = Prompt::Text("seed".into());
    let a = model
        .generate(&p, &params, &mut |_| ControlFlow::Continue(()))
        .unwrap();
    let b = model
        .generate(&p, &params, &mut |_| ControlFlow::Continue(()))
        .unwrap();
    assert_eq!(a.token_ids, b.token_ids);
    params.sampling.seed = 43;
    let c = model
        .generate(&p, &params, &mut |_| ControlFlow::Continue(()))
        .unwrap();
    assert_ne!(
        a.token_ids, c.token_ids,
        "different seeds should differ on a random model"
    );
}

/// Loads each generated `arch` model on two engines at f32 and checks they agree: the same
/// greedy tokens on every prompt `prompts` gives, and every position's log-likelihood of
/// `scored` within 1e-4 (a missing soft-cap, norm or scale moves these even where it leaves
/// the greedy tokens alone).
fn assert_engines_agree(
    engines: [securerun_models::load::Engine; 2],
    prompts: impl Fn(&TextModel) -> Vec<Vec<u32>>,
    scored: impl Fn(&TextModel) -> Vec<u32>,
) {
    use securerun_models::Precision;
    for arch in ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2"] {
        let tmp = tempfile::tempdir().unwrap();
        common::write_model(tmp.path(), arch, DType::F32);
        let source =
            Arc::new(ModelSource::open(tmp.path(), &LoadOptions::default().limits).unwrap());
        let mut models = engines.map(|engine| {
            TextModel::load(
                &source,
                &LoadOptions {
                    engine,
                    precision: Precision::F32,
                    ..Default::default()
                },
            )
            .unwrap()
        });
        for prompt in prompts(&models[1]) {
            let mut tokens = Vec::new();
            for model in models.iter_mut() {
                let out = model
                    .generate_from_ids(&prompt, &greedy(12), &mut |_| ControlFlow::Continue(()))
                    .unwrap();
                tokens.push(out.token_ids);
            }
            assert_eq!(tokens[0], tokens[1], "{arch} {engines:?}, {prompt:?}");
        }
        let ids = scored(&models[1]);
        let (a, b) = (
            models[0].score(&ids, 5).unwrap(),
            models[1].score(&ids, 1).unwrap(),
        );
        for (i, (a, b)) in a.nll.iter().zip(&b.nll).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "{arch} {engines:?} position {i}: {a} vs {b}"
            );
        }
    }
}

fn ids(model: &TextModel, text: &str) -> Vec<u32> {
    model.prompt_ids(&Prompt::Text(text.into())).unwrap()
}

/// The owned decoder against candle-transformers (the reference) on the same generated model
/// of every llama-style family: the same greedy tokens, with and without the KV cache, over a
/// prompt long enough to use several positions per layer (grouped heads included: the
/// generated configs have fewer KV heads than heads).
#[test]
fn the_owned_decoder_matches_the_reference_for_every_llama_style_family() {
    use securerun_models::load::Engine;
    assert_engines_agree(
        [Engine::Best, Engine::Reference],
        |m| {
            ["hello world", "hello hello world world hello world hello"]
                .map(|t| ids(m, t))
                .to_vec()
        },
        |m| {
            ids(
                m,
                "the quick brown fox jumps over the lazy dog, again and again",
            )
        },
    );
}

/// The decoder pass a GPU runs (candle tensors, `Engine::Tensor`, here on the CPU) against
/// the own decoder, every family and variant (soft-caps, sandwich norms, sliding windows, QK
/// norms, fused projections), on prompts as long as the context allows (past the windows).
#[test]
fn the_tensor_decoder_matches_the_own_decoder_for_every_llama_style_family() {
    use securerun_models::load::Engine;
    // The longest prompt that leaves room for the answer.
    let long = |m: &TextModel| {
        let mut t = ids(m, &"hello hello world world hello world hello ".repeat(8));
        t.truncate(m.max_context() - 13);
        t
    };
    assert_engines_agree(
        [Engine::Tensor, Engine::Best],
        |m| vec![ids(m, "hello world"), long(m)],
        long,
    );
}

#[test]
fn a_gemma2_config_with_a_soft_cap_that_is_not_positive_is_refused() {
    for cap in [0.0, -1.0] {
        let tmp = tempfile::tempdir().unwrap();
        common::write_model(tmp.path(), "gemma2", DType::F32);
        let config_path = tmp.path().join("config.json");
        let mut config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
        config["attn_logit_softcapping"] = serde_json::json!(cap);
        std::fs::write(&config_path, serde_json::to_vec(&config).unwrap()).unwrap();
        let source =
            Arc::new(ModelSource::open(tmp.path(), &LoadOptions::default().limits).unwrap());
        let err = TextModel::load(&source, &LoadOptions::default())
            .err()
            .expect("refused");
        assert!(
            matches!(
                err,
                securerun_models::LoadError::Arch(securerun_models::arch::ArchError::Config { .. })
            ),
            "{err}"
        );
    }
}

#[test]
fn quantized_precisions_load_and_decode_and_the_rest_say_why_not() {
    use securerun_models::Precision;
    for arch in ["llama", "qwen3", "phi3", "gemma2"] {
        for precision in [
            Precision::Bf16,
            Precision::Q8_0,
            Precision::Q4_0,
            Precision::Q4K,
        ] {
            let tmp = tempfile::tempdir().unwrap();
            common::write_model(tmp.path(), arch, DType::BF16);
            let source =
                Arc::new(ModelSource::open(tmp.path(), &LoadOptions::default().limits).unwrap());
            let opts = LoadOptions {
                precision,
                ..Default::default()
            };
            let mut model = TextModel::load(&source, &opts).unwrap();
            let prompt = model.prompt_ids(&Prompt::Text("hello".into())).unwrap();
            let out = model
                .generate_from_ids(&prompt, &greedy(4), &mut |_| ControlFlow::Continue(()))
                .unwrap();
            assert_eq!(out.token_ids.len(), 4, "{arch} {precision}");
        }
    }
    // A llama with scaled rotary positions is not on the owned decoder (candle-transformers
    // runs it, at f32/bf16/f16 only): a quantized precision is refused with the reason.
    let tmp = tempfile::tempdir().unwrap();
    common::write_model(tmp.path(), "llama", DType::F32);
    let config_path = tmp.path().join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    config["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64});
    std::fs::write(&config_path, serde_json::to_vec(&config).unwrap()).unwrap();
    let source = Arc::new(ModelSource::open(tmp.path(), &LoadOptions::default().limits).unwrap());
    let err = TextModel::load(
        &source,
        &LoadOptions {
            precision: Precision::Q4_0,
            ..Default::default()
        },
    )
    .err()
    .expect("refused");
    assert!(
        matches!(
            err,
            securerun_models::LoadError::Arch(securerun_models::arch::ArchError::Precision { .. })
        ),
        "{err}"
    );
}

/// Continuous batching changes no output: every request of a batch (prompts chunked across
/// steps, a request joining while others decode, one cancelled, one sampled with a seed,
/// penalties and logit biases) gets exactly the tokens and text it gets alone, for every family on the own
/// decoder and for 16-bit weights.
#[test]
fn batched_generation_gives_each_request_its_unbatched_output() {
    batched_generation_matches_alone(securerun_models::load::Engine::Best, Default::default());
}

/// The same on the decoder pass a GPU runs (candle tensors; here on the CPU at the file's
/// dtype): batching, chunked prompts, a cancellation and seeded sampling work there too.
/// Before, a GPU model generated one request at a time.
#[test]
fn batched_generation_on_the_tensor_decoder_gives_each_request_its_unbatched_output() {
    use securerun_models::{load::Engine, Precision};
    batched_generation_matches_alone(Engine::Tensor, Precision::Auto);
    // Block formats through candle's quantized kernels batch too.
    batched_generation_matches_alone(Engine::Tensor, Precision::Q8_0);
}

fn batched_generation_matches_alone(
    engine: securerun_models::load::Engine,
    precision: securerun_models::Precision,
) {
    use securerun_models::{Batch, BatchLimits, FinishReason};
    let cases = [
        ("llama", DType::F32),
        ("llama", DType::BF16),
        ("mistral", DType::F32),
        ("qwen2", DType::F32),
        ("qwen3", DType::F32),
        ("phi3", DType::F32),
        ("gemma2", DType::F32),
    ];
    for (arch, dtype) in cases {
        let tmp = tempfile::tempdir().unwrap();
        common::write_model(tmp.path(), arch, dtype);
        let mut model = load_at(tmp.path(), engine, precision);
        let texts = [
            "hello world",
            "hello hello world world hello world hello world world",
            "world",
            "hello world hello",
            "world world world hello",
        ];
        let mut requests = Vec::new();
        for (i, text) in texts.iter().enumerate() {
            let ids = model.prompt_ids(&Prompt::Text((*text).into())).unwrap();
            let mut params = greedy(6 + 2 * i);
            if i == 3 {
                params.sampling = SamplingParams {
                    temperature: 1.3,
                    top_k: Some(20),
                    top_p: Some(0.9),
                    repetition_penalty: 1.2,
                    seed: 7,
                    presence_penalty: 0.5,
                    frequency_penalty: 0.3,
                };
                params.logit_bias = vec![(1, 3.0), (2, -100.0)];
            }
            requests.push((ids, params));
        }
        let alone: Vec<_> = requests
            .iter()
            .map(|(ids, params)| {
                model
                    .generate_from_ids(ids, params, &mut |_| ControlFlow::Continue(()))
                    .unwrap()
            })
            .collect();

        let (tx, rx) = std::sync::mpsc::channel::<(usize, String)>();
        let on_text = |i: usize| -> securerun_models::batch::OnText {
            let tx = tx.clone();
            Box::new(move |piece: &str| {
                tx.send((i, piece.to_string())).unwrap();
                ControlFlow::Continue(())
            })
        };
        // Three slots, five tokens a step: prompts are fed in pieces, the fourth and fifth
        // requests wait for a slot and start while the others decode.
        let limits = BatchLimits {
            max_sequences: 3,
            max_step_tokens: 5,
        };
        let mut batch = Batch::new(&model, limits).unwrap();
        let mut ids = std::collections::HashMap::new();
        let mut results = std::collections::HashMap::new();
        let mut next = 0;
        let mut steps = 0;
        while results.len() < requests.len() {
            while next < requests.len() && batch.has_room() {
                let (prompt, params) = &requests[next];
                let id = batch.add(prompt, params, None, on_text(next)).unwrap();
                ids.insert(id, next);
                next += 1;
            }
            for f in batch.step().unwrap() {
                results.insert(ids[&f.id], f.result.unwrap());
            }
            steps += 1;
            assert!(steps < 200, "{arch}: the batch does not finish");
        }
        drop(tx);
        let mut streamed = vec![String::new(); requests.len()];
        for (i, piece) in rx.iter() {
            streamed[i].push_str(&piece);
        }
        for (i, a) in alone.iter().enumerate() {
            let b = &results[&i];
            // The tensor decoder's sums may differ in the last bits with the batch's shape
            // (module docs): the sampled request (3) can then draw another token once a
            // draw falls between them; greedy ones do not move.
            if engine == securerun_models::load::Engine::Tensor && i == 3 {
                assert_eq!(a.token_ids.len(), b.token_ids.len(), "{arch} request {i}");
            } else {
                assert_eq!(a.token_ids, b.token_ids, "{arch} {dtype:?} request {i}");
                assert_eq!(a.text, b.text, "{arch} {dtype:?} request {i}");
            }
            assert_eq!(streamed[i], b.text, "{arch} {dtype:?} request {i} streamed");
            assert_eq!(b.finish_reason, FinishReason::Length);
        }
        // Fewer steps than one request after another would take.
        let sequential: usize = alone.iter().map(|g| g.token_ids.len()).sum();
        assert!(steps < sequential, "{arch}: {steps} steps");

        // A cancelled request leaves at once; the one beside it is untouched.
        let mut batch = Batch::new(&model, limits).unwrap();
        let quiet = |_: &str| ControlFlow::Continue(());
        let keep = batch
            .add(&requests[1].0, &requests[1].1, None, Box::new(quiet))
            .unwrap();
        let gone = batch
            .add(&requests[0].0, &requests[0].1, None, Box::new(quiet))
            .unwrap();
        batch.step().unwrap();
        batch.step().unwrap();
        let cancelled = batch.cancel(gone).unwrap();
        assert_eq!(cancelled.finish_reason, FinishReason::Cancelled);
        assert!(batch.cancel(gone).is_none());
        let mut kept = None;
        while kept.is_none() {
            for f in batch.step().unwrap() {
                assert_eq!(f.id, keep);
                kept = Some(f.result.unwrap());
            }
        }
        assert_eq!(kept.unwrap().token_ids, alone[1].token_ids, "{arch}");
    }
}

/// The tensor pass with block-format weights (what a GPU runs for `--dtype q8_0|q4_0|q4_k`,
/// candle's quantized kernels; here on the CPU) for every family: its log-likelihoods stay
/// as close to f32's as the own decoder's at the same precision (within 3× its distance, on
/// these tiny random models where quantization moves a lot). A weight quantized from the
/// wrong rows (a fused projection's part read from the start of the matrix, as candle's
/// quantizer does with a narrowed view) lands several nats away.
#[test]
fn the_tensor_decoder_with_block_formats_keeps_the_own_decoders_quality() {
    use securerun_models::{load::Engine, Precision};
    for arch in ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2"] {
        let tmp = tempfile::tempdir().unwrap();
        common::write_model(tmp.path(), arch, DType::F32);
        let mut f32 = load_at(tmp.path(), Engine::Best, Precision::F32);
        let ids = f32
            .prompt_ids(&Prompt::Text("hello world hello hello world".into()))
            .unwrap();
        let exact = f32.score(&ids, 5).unwrap().nll;
        for precision in [Precision::Q8_0, Precision::Q4_0, Precision::Q4K] {
            let distance = |engine| {
                let nll = load_at(tmp.path(), engine, precision)
                    .score(&ids, 5)
                    .unwrap()
                    .nll;
                nll.iter()
                    .zip(&exact)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f64, f64::max)
            };
            let (tensor, own) = (distance(Engine::Tensor), distance(Engine::Best));
            assert!(
                tensor <= 3.0 * own + 0.1,
                "{arch} {precision}: {tensor} from f32, the own decoder {own}"
            );
        }
    }
}

/// A prompt id the model has no row for (a tokenizer with more added tokens than the model's
/// `vocab_size` lets one through) is refused when it is added, for that request alone: the
/// generation already running beside it finishes with its lone tokens. Before, the id reached
/// the batched pass, which failed the whole step and every request in it (the victims' errors
/// even named the attacker's token).
#[test]
fn an_id_outside_the_vocabulary_fails_its_request_not_the_batch() {
    use securerun_models::load::Engine;
    use securerun_models::{Batch, BatchLimits, GenerateError};
    for engine in [Engine::Best, Engine::Tensor] {
        let tmp = tempfile::tempdir().unwrap();
        common::write_model(tmp.path(), "llama", DType::F32);
        let mut model = load_on(tmp.path(), engine);
        let prompt = model
            .prompt_ids(&Prompt::Text("hello world".into()))
            .unwrap();
        let alone = model
            .generate_from_ids(&prompt, &greedy(6), &mut |_| ControlFlow::Continue(()))
            .unwrap();
        let limits = BatchLimits {
            max_sequences: 2,
            max_step_tokens: 8,
        };
        let mut batch = Batch::new(&model, limits).unwrap();
        let quiet =
            || -> securerun_models::batch::OnText { Box::new(|_| ControlFlow::Continue(())) };
        let victim = batch.add(&prompt, &greedy(6), None, quiet()).unwrap();
        batch.step().unwrap();
        let vocab = common::config("llama")["vocab_size"].as_u64().unwrap() as u32;
        let refused = batch.add(&[1, vocab], &greedy(2), None, quiet());
        assert!(
            matches!(refused, Err(GenerateError::Params(ref m)) if m.contains("vocabulary")),
            "{engine:?}: {:?}",
            refused.err()
        );
        let done = loop {
            if let Some(f) = batch.step().unwrap().pop() {
                break f;
            }
        };
        assert_eq!(done.id, victim);
        assert_eq!(
            done.result.unwrap().token_ids,
            alone.token_ids,
            "{engine:?}"
        );
    }
}

/// A short prompt that arrives behind a long one is fed within the next step, not after the
/// long prompt's whole prefill (the step's prompt budget is shared, shortest first).
#[test]
fn a_short_prompt_is_not_held_behind_a_long_prefill() {
    use securerun_models::{Batch, BatchLimits};
    let tmp = tempfile::tempdir().unwrap();
    common::write_model(tmp.path(), "llama", DType::F32);
    let model = load(tmp.path());
    let long = model
        .prompt_ids(&Prompt::Text("hello world ".repeat(6)))
        .unwrap();
    let short = model.prompt_ids(&Prompt::Text("world".into())).unwrap();
    assert!(
        long.len() > 32 && short.len() < 8,
        "{} {}",
        long.len(),
        short.len()
    );
    let limits = BatchLimits {
        max_sequences: 2,
        max_step_tokens: 16,
    };
    let mut batch = Batch::new(&model, limits).unwrap();
    let quiet = || -> securerun_models::batch::OnText { Box::new(|_| ControlFlow::Continue(())) };
    batch.add(&long, &greedy(4), None, quiet()).unwrap();
    batch.add(&short, &greedy(4), None, quiet()).unwrap();
    batch.step().unwrap();
    assert_eq!(
        batch.prefilling(),
        1,
        "the short prompt was fed in the first step"
    );
}

/// A kept cache serves the longest shared prefix of the next prompt with the same key: only
/// the rest is computed, and the tokens are exactly those of a fresh prefill. Under another
/// key, or none, nothing is reused.
#[test]
fn a_kept_prefix_is_reused_under_its_own_key_and_changes_no_token() {
    use securerun_models::load::Engine;
    use securerun_models::{Batch, BatchLimits, PrefixKey};
    for (arch, dtype, engine) in [
        ("llama", DType::F32, Engine::Best),
        ("llama", DType::BF16, Engine::Best),
        ("qwen3", DType::F32, Engine::Best),
        ("llama", DType::F32, Engine::Tensor),
        ("gemma2", DType::BF16, Engine::Tensor),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        common::write_model(tmp.path(), arch, dtype);
        let mut model = load_on(tmp.path(), engine);
        let ids = |text: &str| model.prompt_ids(&Prompt::Text(text.into())).unwrap();
        let first = ids("hello world hello world world hello");
        let longer = ids("hello world hello world world hello world world hello");
        assert_eq!(longer[..first.len()], first[..], "{arch}: a shared prefix");
        let params = greedy(5);
        let alone = |model: &mut securerun_models::TextModel, prompt: &[u32]| {
            model
                .generate_from_ids(prompt, &params, &mut |_| ControlFlow::Continue(()))
                .unwrap()
        };
        let (alone_first, alone_longer) = (alone(&mut model, &first), alone(&mut model, &longer));
        let limits = BatchLimits {
            max_sequences: 2,
            max_step_tokens: 8,
        };
        let mut batch = Batch::new(&model, limits).unwrap();
        let mut run = |prompt: &[u32], key: Option<PrefixKey>| {
            let quiet: securerun_models::batch::OnText = Box::new(|_| ControlFlow::Continue(()));
            let id = batch.add(prompt, &params, key, quiet).unwrap();
            loop {
                if let Some(f) = batch.step().unwrap().into_iter().next() {
                    assert_eq!(f.id, id);
                    break f.result.unwrap();
                }
            }
        };
        let (a, b) = (Some(PrefixKey(1)), Some(PrefixKey(2)));
        let g = run(&first, a);
        assert_eq!((g.cached_tokens, &g.token_ids), (0, &alone_first.token_ids));
        // The same key: the first prompt (and what was generated after it, if the longer
        // prompt goes on the same way) comes from the cache.
        let g = run(&longer, a);
        assert!(
            g.cached_tokens >= first.len(),
            "{arch}: {}",
            g.cached_tokens
        );
        assert_eq!(g.token_ids, alone_longer.token_ids, "{arch} {dtype:?}");
        // The very same prompt again: all but its last token.
        let g = run(&longer, a);
        assert_eq!(g.cached_tokens, longer.len() - 1, "{arch}");
        assert_eq!(g.token_ids, alone_longer.token_ids, "{arch} {dtype:?}");
        // The first prompt's own cache was copied from, not consumed: still all there.
        let g = run(&first, a);
        assert_eq!(g.cached_tokens, first.len() - 1, "{arch}");
        assert_eq!(g.token_ids, alone_first.token_ids, "{arch} {dtype:?}");
        // Another key, or none: computed afresh, the same tokens.
        for key in [b, None] {
            let g = run(&longer, key);
            assert_eq!(g.cached_tokens, 0, "{arch}: {key:?} got key 1's prefix");
            assert_eq!(g.token_ids, alone_longer.token_ids, "{arch} {dtype:?}");
        }
    }
}

/// The quantized path for GPUs (candle's quantized llama; the reference engine runs it on the
/// CPU): it decodes a tiny llama, and a configuration it cannot run (KV heads that do not
/// divide the heads, a rotary size that is not even) is refused with the precision's reason
/// before a weight is read, never a panic or a shape error mid-generation.
#[test]
fn the_quantized_gpu_path_runs_what_it_can_and_refuses_the_rest() {
    use securerun_models::load::Engine;
    use securerun_models::Precision;
    let load = |edit: &dyn Fn(&mut serde_json::Value)| {
        let tmp = tempfile::tempdir().unwrap();
        common::write_model(tmp.path(), "llama", DType::F32);
        let path = tmp.path().join("config.json");
        let mut config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        edit(&mut config);
        std::fs::write(&path, serde_json::to_vec(&config).unwrap()).unwrap();
        let source =
            Arc::new(ModelSource::open(tmp.path(), &LoadOptions::default().limits).unwrap());
        let opts = LoadOptions {
            engine: Engine::Reference,
            precision: Precision::Q8_0,
            ..Default::default()
        };
        TextModel::load(&source, &opts)
    };
    let mut model = load(&|_| {}).unwrap();
    let prompt = model.prompt_ids(&Prompt::Text("hello".into())).unwrap();
    let out = model
        .generate_from_ids(&prompt, &greedy(4), &mut |_| ControlFlow::Continue(()))
        .unwrap();
    assert_eq!(out.token_ids.len(), 4);
    for edit in [
        &(|c: &mut serde_json::Value| c["num_key_value_heads"] = 3.into())
            as &dyn Fn(&mut serde_json::Value),
        &|c: &mut serde_json::Value| {
            c["hidden_size"] = 36.into();
        },
    ] {
        let err = load(edit).err().expect("refused");
        assert!(
            matches!(
                err,
                securerun_models::LoadError::Arch(
                    securerun_models::arch::ArchError::Precision { .. }
                )
            ),
            "{err}"
        );
    }
}
