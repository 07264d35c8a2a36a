#!/usr/bin/env python3
"""llama.cpp's perplexity on tests/fixtures/quality.txt for each type, on the same weights as
securerun's SmolLM2 (the F32 GGUF of the converted values and llama.cpp's own quantizations of it,
made by benches/compare_precisions.py), written into tests/reference/quality.json for
tests/quality.rs to hold securerun to (at most 1 % worse at the same type).

Both sides score the same token ids (the JSON's `ids`; llama.cpp's own tokenization of the text
is checked against them): every token after the first predicted from those before it.

Needs: pip install llama-cpp-python gguf numpy   (not needed by CI)
Usage: benches/quality_llamacpp.py
"""
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, ".cache", "models")
REF = os.path.join(ROOT, "tests", "reference", "quality.json")
TYPES = {"f32": "F32", "bf16": "BF16", "f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k": "Q4_K_M"}


def perplexity(path, ids):
    from llama_cpp import Llama
    llm = Llama(model_path=path, n_ctx=len(ids) + 8, n_batch=512, n_threads=os.cpu_count(),
                logits_all=True, verbose=False)
    llm.eval(ids[:-1])
    logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
    m = logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(logits - m).sum(axis=1)) + m[:, 0]
    nll = lse - logits[np.arange(len(ids) - 1), ids[1:]]
    return float(np.exp(nll.mean())), llm


def main():
    sys.path.insert(0, os.path.join(ROOT, "benches"))
    import compare_precisions
    compare_precisions.prepare(["small"], list(TYPES))
    ref = json.load(open(REF))
    ids = ref["ids"]
    text = open(os.path.join(ROOT, "tests", "fixtures", "quality.txt")).read()
    results = {}
    for ours, name in TYPES.items():
        path = os.path.join(CACHE, f"SmolLM2-135M-Instruct.{name}.gguf")
        ppl, llm = perplexity(path, ids)
        theirs = llm.tokenize(text.encode(), add_bos=False, special=False)
        if list(theirs) != ids:
            print(f"warning: llama.cpp tokenizes the text differently ({len(theirs)} vs {len(ids)} ids)")
        results[ours] = round(ppl, 4)
        print(f"{ours:<5} ({name}): perplexity {ppl:.4f}")
    ref["llamacpp"] = results
    json.dump(ref, open(REF, "w"))


if __name__ == "__main__":
    sys.exit(main())
