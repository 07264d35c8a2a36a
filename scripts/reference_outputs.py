#!/usr/bin/env python3
"""Produce the reference outputs that tests compare securerun against (committed under tests/reference/).

SmolLM2: Hugging Face transformers loads the *original* GGUF itself (its own dequantizer and
tokenizer conversion, independent of scripts/convert_smollm2.py) in float32, and decodes greedily.
all-MiniLM-L6-v2: sentence-transformers encodes (mean pooling + L2 normalization).

Needs: pip install torch transformers sentence-transformers gguf   (not needed by CI)
Usage: reference_outputs.py MODELS_DIR OUT_DIR
"""
import json
import os
import sys

import torch
from sentence_transformers import SentenceTransformer
from transformers import AutoModelForCausalLM, AutoTokenizer

NEW_TOKENS = 40

PLAIN_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
]
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the ocean.",
    "Explain in two sentences why the sky is blue.",
    "List three fruits that are red.",
]
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome.",
    "A cheetah is running behind its prey.",
    "Ünïcödé text, emoji 🚀 and numbers 12345.",
    "",
]


def smollm2(models_dir):
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(models_dir, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(models_dir, gguf_file=gguf, torch_dtype=torch.float32)
    model.eval()
    cases = []
    for chat, prompts in [(False, PLAIN_PROMPTS), (True, CHAT_PROMPTS)]:
        for p in prompts:
            if chat:
                text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            else:
                text = p
            ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=tok.eos_token_id)
            new = out[0, ids.shape[1]:].tolist()
            cases.append({
                "prompt": p,
                "chat": chat,
                "rendered_prompt": text,
                "prompt_ids": ids[0].tolist(),
                "generated_ids": new,
                "generated_text": tok.decode(new, skip_special_tokens=True),
            })
            print(repr(p), len(new), repr(cases[-1]["generated_text"]), file=sys.stderr)
    return {"model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized f32)", "max_new_tokens": NEW_TOKENS,
            "decoding": "greedy", "producer": "transformers", "cases": cases}


def minilm(models_dir):
    model = SentenceTransformer(os.path.join(models_dir, "all-minilm-l6-v2"), device="cpu")
    emb = model.encode(SENTENCES, normalize_embeddings=False, convert_to_numpy=True)
    return {"model": "sentence-transformers/all-MiniLM-L6-v2", "producer": "sentence-transformers",
            "cases": [{"text": s, "embedding": [round(float(x), 7) for x in e]} for s, e in zip(SENTENCES, emb)]}


def main():
    models_dir, out = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    with open(os.path.join(out, "minilm.json"), "w") as f:
        json.dump(minilm(models_dir), f)
        f.write("\n")
    with open(os.path.join(out, "smollm2.json"), "w") as f:
        json.dump(smollm2(models_dir), f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
