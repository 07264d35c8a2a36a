//! Quality at every run precision on a fixed text (tests/fixtures/quality.txt) with the real
//! SmolLM2-135M: teacher-forced top-1 agreement with f32 and perplexity, held to bounds and to
//! llama.cpp's perplexity for the same type on the same weights (tests/reference/quality.json,
//! made by benches/quality_llamacpp.py: ours may be worse by at most 1 %).

mod common;

use securerun::models::{Precision, Score};
use securerun::open_text_model;

fn fixed_text_ids() -> Vec<u32> {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/quality.txt"),
    )
    .unwrap();
    let model = open_text_model(&common::smollm2(), &common::unsigned()).unwrap();
    model
        .tokenizer()
        .encode(text, false)
        .unwrap()
        .get_ids()
        .to_vec()
}

fn score(precision: Precision, ids: &[u32]) -> Score {
    let opts = securerun::OpenOptions {
        precision,
        ..common::unsigned()
    };
    let mut model = open_text_model(&common::smollm2(), &opts).unwrap();
    model.score(ids, 64).unwrap()
}

#[test]
fn every_precision_keeps_quality_on_a_fixed_text() {
    let reference = common::reference("quality.json");
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/quality.txt"),
    )
    .unwrap();
    let model = open_text_model(&common::smollm2(), &common::unsigned()).unwrap();
    let ids = model
        .tokenizer()
        .encode(text, false)
        .unwrap()
        .get_ids()
        .to_vec();
    drop(model);
    let expected: Vec<u32> = serde_json::from_value(reference["ids"].clone()).unwrap();
    assert_eq!(
        ids, expected,
        "the text tokenizes as when llama.cpp scored it"
    );

    let f32 = score(Precision::F32, &ids);
    // (precision, least top-1 agreement with f32, most perplexity over f32)
    let bounds = [
        // The default must not change quality measurably (README: the bar for `auto`).
        (Precision::Auto, 0.99, 1.001),
        (Precision::Bf16, 0.97, 1.01),
        (Precision::F16, 0.98, 1.005),
        (Precision::Q8_0, 0.95, 1.02),
        (Precision::Q4K, 0.90, 1.05),
        (Precision::Q4_0, 0.65, 1.25),
    ];
    let mut table = format!("f32: perplexity {:.4}\n", f32.perplexity());
    let mut failures = Vec::new();
    for (precision, agreement_min, ratio_max) in bounds {
        let s = score(precision, &ids);
        let (agree, ppl) = (s.top1_agreement(&f32), s.perplexity());
        let llamacpp = reference["llamacpp"][precision.resolve().to_string()].as_f64();
        table += &format!(
            "{precision}: top-1 agreement {agree:.4}, perplexity {ppl:.4} (x{:.4} of f32; llama.cpp {llamacpp:?})\n",
            ppl / f32.perplexity()
        );
        if agree < agreement_min {
            failures.push(format!("{precision}: agreement {agree} < {agreement_min}"));
        }
        if ppl > f32.perplexity() * ratio_max {
            failures.push(format!("{precision}: perplexity {ppl} > {ratio_max} x f32"));
        }
        if let Some(theirs) = llamacpp {
            if ppl > theirs * 1.01 {
                failures.push(format!(
                    "{precision}: perplexity {ppl} > 1.01 x llama.cpp's {theirs}"
                ));
            }
        }
    }
    if let Some(theirs) = reference["llamacpp"]["f32"].as_f64() {
        // The same weights in f32 on both sides: the two engines agree closely.
        assert!(
            (f32.perplexity() / theirs - 1.0).abs() < 0.01,
            "f32 perplexity {} vs llama.cpp {theirs}\n{table}",
            f32.perplexity()
        );
    }
    eprintln!("{table}");
    assert!(failures.is_empty(), "{failures:?}\n{table}");
}

/// Quantized weights through candle's quantized kernels, on the CPU, the two ways they are
/// run, each held to the own decoder's bounds on the fixed text and to llama.cpp's perplexity
/// for the same formats:
/// - the decoder pass on candle tensors (`Engine::Tensor`): the path `--dtype q8_0|q4_0|q4_k`
///   takes on a GPU, where the own decoder's CPU kernels cannot go (the same code; candle's
///   kernels for the device differ);
/// - candle's quantized llama (`Engine::Reference`): the real model quantized, written as GGUF
///   in memory with llama.cpp's names and rotary row order, and read back (a wrong row order
///   or name gives noise, not these numbers).
#[test]
fn the_quantized_path_for_gpus_keeps_quality_on_a_fixed_text() {
    use securerun::models::load::Engine;
    use securerun::models::{LoadOptions, ModelSource, TextModel};
    let reference = common::reference("quality.json");
    let ids = fixed_text_ids();
    let f32 = score(Precision::F32, &ids);
    let source = std::sync::Arc::new(
        ModelSource::open(&common::smollm2(), &LoadOptions::default().limits).unwrap(),
    );
    let mut failures = Vec::new();
    let mut table = String::new();
    let cases = [
        (Precision::Q8_0, 0.95, 1.02),
        (Precision::Q4K, 0.90, 1.05),
        (Precision::Q4_0, 0.65, 1.25),
    ];
    let engines = [Engine::Tensor, Engine::Reference];
    for (engine, (precision, agreement_min, ratio_max)) in engines
        .into_iter()
        .flat_map(|e| cases.into_iter().map(move |c| (e, c)))
    {
        let opts = LoadOptions {
            engine,
            precision,
            ..Default::default()
        };
        let mut model = TextModel::load(&source, &opts).unwrap();
        let s = model.score(&ids, 64).unwrap();
        let (agree, ppl) = (s.top1_agreement(&f32), s.perplexity());
        let llamacpp = reference["llamacpp"][precision.to_string()].as_f64();
        table += &format!(
            "{precision} ({engine:?}, candle's kernels): top-1 agreement {agree:.4}, perplexity {ppl:.4} (llama.cpp {llamacpp:?})\n"
        );
        if agree < agreement_min || ppl > f32.perplexity() * ratio_max {
            failures.push(format!(
                "{precision} {engine:?}: agreement {agree}, perplexity {ppl}"
            ));
        }
        if llamacpp.is_some_and(|theirs| ppl > theirs * 1.02) {
            failures.push(format!(
                "{precision} {engine:?}: perplexity {ppl} > 1.02 x llama.cpp's"
            ));
        }
    }
    eprintln!("{table}");
    assert!(failures.is_empty(), "{failures:?}\n{table}");
}
