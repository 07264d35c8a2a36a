//! Tiny generated models for fast tests: random weights in the exact tensor layout each
//! candle-transformers architecture asks for (recorded through a `VarMap`), a byte-level BPE
//! tokenizer, and a ChatML template.

#![allow(dead_code)]

use std::path::Path;

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models as m;
use serde_json::json;

pub const VOCAB: usize = 300;

/// Config for each tiny architecture (hidden 32, 2 layers, 4 heads, 2 kv heads).
pub fn config(arch: &str) -> serde_json::Value {
    let common = json!({
        "model_type": arch, "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "hidden_act": "silu", "eos_token_id": 1, "bos_token_id": 0, "tie_word_embeddings": false,
    });
    let mut c = common.as_object().unwrap().clone();
    let extra = match arch {
        "llama" => json!({}),
        "mistral" => json!({"sliding_window": 64, "head_dim": 8}),
        "qwen2" => {
            json!({"sliding_window": 64, "max_window_layers": 2, "use_sliding_window": false, "tie_word_embeddings": true})
        }
        "qwen3" => {
            json!({"head_dim": 8, "attention_bias": false, "sliding_window": null, "max_window_layers": 2, "use_sliding_window": false})
        }
        "phi3" => json!({}),
        "gemma2" => {
            json!({"head_dim": 8, "hidden_activation": "gelu_pytorch_tanh", "attention_bias": false,
                            "final_logit_softcapping": 0.5, "attn_logit_softcapping": 0.5,
                            "query_pre_attn_scalar": 8, "sliding_window": 64})
        }
        "bert" => json!({"hidden_act": "gelu", "hidden_dropout_prob": 0.1, "type_vocab_size": 2,
                          "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0,
                          "max_position_embeddings": 64}),
        other => panic!("no tiny config for {other}"),
    };
    for (k, v) in extra.as_object().unwrap() {
        c.insert(k.clone(), v.clone());
    }
    serde_json::Value::Object(c)
}

/// Creates every weight the architecture's constructor asks for, at `dtype`.
fn weights(arch: &str, cfg: &serde_json::Value, dtype: DType) -> VarMap {
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, dtype, &Device::Cpu);
    let c = cfg.clone();
    match arch {
        "llama" => {
            let lc: m::llama::LlamaConfig = serde_json::from_value(c).unwrap();
            m::llama::Llama::load(vb, &lc.into_config(false)).map(drop)
        }
        "mistral" => m::mistral::Model::new(&serde_json::from_value(c).unwrap(), vb).map(drop),
        "qwen2" => {
            m::qwen2::ModelForCausalLM::new(&serde_json::from_value(c).unwrap(), vb).map(drop)
        }
        "qwen3" => {
            m::qwen3::ModelForCausalLM::new(&serde_json::from_value(c).unwrap(), vb).map(drop)
        }
        "phi3" => m::phi3::Model::new(&serde_json::from_value(c).unwrap(), vb).map(drop),
        "gemma2" => m::gemma2::Model::new(false, &serde_json::from_value(c).unwrap(), vb).map(drop),
        "bert" => m::bert::BertModel::load(vb, &serde_json::from_value(c).unwrap()).map(drop),
        other => panic!("no tiny weights for {other}"),
    }
    .unwrap();
    map
}

/// A byte-level BPE tokenizer: `<s>`, `</s>`, `<|im_start|>`, `<|im_end|>`, then the 256 byte
/// symbols, no merges.
pub fn tokenizer_json() -> serde_json::Value {
    let specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"];
    let mut alphabet: Vec<char> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
        .into_iter()
        .collect();
    alphabet.sort_unstable();
    let mut vocab = serde_json::Map::new();
    for (i, s) in specials.iter().enumerate() {
        vocab.insert(s.to_string(), json!(i));
    }
    for (i, ch) in alphabet.iter().enumerate() {
        vocab.insert(ch.to_string(), json!(i + specials.len()));
    }
    let added: Vec<_> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"id": i, "content": s, "single_word": false, "lstrip": false,
                             "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": []}
    })
}

pub const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Writes a complete tiny model directory for `arch` with weights stored as `dtype`.
pub fn write_model(dir: &Path, arch: &str, dtype: DType) {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = config(arch);
    weights(arch, &cfg, dtype)
        .save(dir.join("model.safetensors"))
        .unwrap();
    let write = |name: &str, v: &serde_json::Value| {
        std::fs::write(dir.join(name), serde_json::to_vec_pretty(v).unwrap()).unwrap()
    };
    write("config.json", &cfg);
    write("tokenizer.json", &tokenizer_json());
    write(
        "tokenizer_config.json",
        &json!({"chat_template": CHATML, "bos_token": "<s>", "eos_token": "</s>"}),
    );
    write("generation_config.json", &json!({"eos_token_id": [1, 3]}));
    if arch == "bert" {
        write(
            "modules.json",
            &json!([
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
            ]),
        );
        std::fs::create_dir_all(dir.join("1_Pooling")).unwrap();
        write(
            "1_Pooling/config.json",
            &json!({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": true}),
        );
    }
}
