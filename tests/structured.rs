//! Constrained decoding on a real model (SmolLM2-135M-Instruct): JSON mode and JSON schemas give
//! output that parses and validates on every reference prompt, greedy and sampled; bad schemas
//! and the grammar's bounds are typed errors before a token is generated.

mod common;

use std::ops::ControlFlow;

use securerun::models::grammar::{GrammarError, OutputGrammar, MAX_SCHEMA_DEPTH};
use securerun::models::{GenerateError, SamplingParams};
use securerun::{open_text_model, ChatMessage, GenerationParams, Prompt};
use serde_json::{json, Value};

/// Prompts that do not ask for JSON at all, and some that ask for something else: the grammar,
/// not the prompt, makes the output JSON.
const PROMPTS: &[&str] = &[
    "Describe a person.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three colors.",
    "Give me a recipe for pancakes.",
];

fn schemas() -> Vec<Value> {
    vec![
        json!({
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 40},
                "age": {"type": "integer", "minimum": 0, "maximum": 150},
                "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3}
            },
            "required": ["name", "age", "hobbies"],
            "additionalProperties": false
        }),
        json!({
            "type": "object",
            "properties": {
                "answer": {"enum": ["yes", "no", "unknown"]},
                "confidence": {"type": "number"},
                "city": {"$ref": "#/$defs/city"}
            },
            "required": ["answer", "city"],
            "additionalProperties": false,
            "$defs": {"city": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30}}, "required": ["name"], "additionalProperties": false}}
        }),
    ]
}

fn generate(
    model: &mut securerun::models::TextModel,
    prompt: &str,
    grammar: OutputGrammar,
    sampling: SamplingParams,
) -> Result<securerun::models::Generation, GenerateError> {
    let params = GenerationParams {
        max_tokens: 200,
        sampling,
        grammar: Some(grammar),
        ..Default::default()
    };
    model.generate(
        &Prompt::Chat(vec![ChatMessage::new("user", prompt)]),
        &params,
        &mut |_| ControlFlow::Continue(()),
    )
}

#[test]
fn every_schema_output_parses_and_validates() {
    let mut model = open_text_model(&common::smollm2(), &common::unsigned()).unwrap();
    for schema in schemas() {
        let validator = jsonschema::validator_for(&schema).unwrap();
        for (i, prompt) in PROMPTS.iter().enumerate() {
            for sampling in [
                SamplingParams::default(),
                SamplingParams {
                    temperature: 1.0,
                    seed: i as u64,
                    ..Default::default()
                },
            ] {
                let grammar = OutputGrammar::JsonSchema {
                    schema: schema.to_string(),
                };
                let g = generate(&mut model, prompt, grammar, sampling).unwrap();
                assert_eq!(g.finish_reason.as_str(), "stop", "{prompt}: {}", g.text);
                let value: Value = serde_json::from_str(&g.text)
                    .unwrap_or_else(|e| panic!("{prompt}: {e}: {}", g.text));
                assert!(validator.is_valid(&value), "{prompt}: {}", g.text);
            }
        }
    }
}

#[test]
fn json_mode_gives_an_object_every_time() {
    let mut model = open_text_model(&common::smollm2(), &common::unsigned()).unwrap();
    for (i, prompt) in PROMPTS.iter().enumerate() {
        let sampling = SamplingParams {
            temperature: 0.8,
            seed: 7 + i as u64,
            ..Default::default()
        };
        let g = generate(&mut model, prompt, OutputGrammar::JsonObject, sampling).unwrap();
        if g.finish_reason.as_str() == "stop" {
            let v: Value =
                serde_json::from_str(&g.text).unwrap_or_else(|e| panic!("{e}: {}", g.text));
            assert!(v.is_object(), "{}", g.text);
        } else {
            // Out of budget: what there is must still be a prefix of an object.
            assert!(g.text.starts_with('{'), "{}", g.text);
        }
    }
    // Without the grammar the same prompt is prose: the grammar made the difference.
    let g = model
        .generate(
            &Prompt::Chat(vec![ChatMessage::new("user", PROMPTS[1])]),
            &GenerationParams {
                max_tokens: 20,
                ..Default::default()
            },
            &mut |_| ControlFlow::Continue(()),
        )
        .unwrap();
    assert!(
        serde_json::from_str::<Value>(&g.text).is_err(),
        "{}",
        g.text
    );
}

#[test]
fn bad_and_oversized_schemas_are_typed_errors() {
    let mut model = open_text_model(&common::smollm2(), &common::unsigned()).unwrap();
    let deep = (0..MAX_SCHEMA_DEPTH + 2).fold(
        json!({"type": "string"}),
        |inner, _| json!({"type": "array", "items": inner}),
    );
    let cases = [
        (deep.to_string(), "deep"),
        ("{\"type\": ".into(), "not json"),
        (
            json!({"type": "object", "properties": {"a": {"type": "nonsense"}}}).to_string(),
            "bad type",
        ),
        (
            json!({"type": "string", "minLength": 5, "maxLength": 2}).to_string(),
            "unsatisfiable",
        ),
        (
            json!({"$ref": "https://example.com/schema.json"}).to_string(),
            "remote ref",
        ),
    ];
    for (schema, what) in cases {
        let err = generate(
            &mut model,
            "Hi",
            OutputGrammar::JsonSchema { schema },
            SamplingParams::default(),
        )
        .unwrap_err();
        assert!(matches!(err, GenerateError::Grammar(_)), "{what}: {err}");
    }
    // A small schema that trips an assertion inside the engine: an error without its text.
    let tangled = json!({"allOf": (0..6).map(|i| json!({"anyOf": (0..4).map(|k| json!({"type": "object",
        "properties": {format!("p{i}_{k}"): {"type": "integer"}}})).collect::<Vec<_>>()})).collect::<Vec<_>>()});
    let err = generate(
        &mut model,
        "Hi",
        OutputGrammar::JsonSchema {
            schema: tangled.to_string(),
        },
        SamplingParams::default(),
    );
    if let Err(e) = err {
        let text = e.to_string();
        assert!(
            !text.contains("panic") && !text.contains("assertion"),
            "{text}"
        );
    }
    let deep = generate(
        &mut model,
        "Hi",
        OutputGrammar::JsonSchema {
            schema: deep.to_string(),
        },
        SamplingParams::default(),
    )
    .unwrap_err();
    assert!(
        matches!(deep, GenerateError::Grammar(GrammarError::TooDeep)),
        "{deep}"
    );
    // The model still answers afterwards.
    let g = generate(
        &mut model,
        "Hi",
        OutputGrammar::JsonObject,
        SamplingParams::default(),
    )
    .unwrap();
    assert!(g.text.starts_with('{'));
}
