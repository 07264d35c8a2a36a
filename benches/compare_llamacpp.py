#!/usr/bin/env python3
"""securerun vs llama.cpp (llama-cpp-python) on the same weights, threads and greedy settings.

The same weights: securerun runs the f32 safetensors that scripts/convert_smollm2.py dequantized
from the packaged Q4_1 GGUF; llama.cpp runs an f32 GGUF made here from that same GGUF (every
tensor dequantized to f32, metadata copied), so both compute on identical f32 values. The
original Q4_1 GGUF is also timed, as llama.cpp's natural habitat (not the same weights).

Prefill: one forward pass over the same 128-token prompt. Decode: 128 greedy steps
(argmax included on both sides). Median of 3 runs.

Needs: pip install llama-cpp-python gguf numpy   (not needed by CI)
Usage: benches/compare_llamacpp.py [--threads N] [--models-dir DIR]
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

PREFILL = 128
DECODE = 128
RUNS = 3
TEXT = "The history of the city begins with a small settlement by the river. " * 40


def make_f32_gguf(src, dst):
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name == "general.file_type":
            writer.add_key_value(name, 0, gguf.GGUFValueType.UINT32)  # ALL_F32
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(x) for x in reversed(t.shape.tolist())])
        writer.add_tensor(t.name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llamacpp(path, threads):
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=512,
                n_batch=512, logits_all=False, verbose=False)
    load_s = time.perf_counter() - t0
    tokens = llm.tokenize(TEXT.encode(), add_bos=False, special=False)[:PREFILL]
    prefill, decode = [], []
    for _ in range(RUNS):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(tokens)
        prefill.append(len(tokens) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        for _ in range(DECODE - 1):
            llm.eval([tok])
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        decode.append((DECODE - 1) / (time.perf_counter() - t0))
    return {"load_s": load_s, "prefill_tok_s": float(np.median(prefill)),
            "decode_tok_s": float(np.median(decode))}


def securerun(threads, root):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    out = subprocess.run(["cargo", "bench", "--quiet", "--bench", "inference", "--", "--json"],
                         cwd=root, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--models-dir", default=os.path.join(root, ".cache", "models"))
    args = ap.parse_args()

    q41 = os.path.join(args.models_dir, "SmolLM2-135M-Instruct.Q4_1.gguf")
    f32 = os.path.join(args.models_dir, "SmolLM2-135M-Instruct.F32.gguf")
    if not os.path.exists(f32):
        make_f32_gguf(q41, f32 + ".tmp")
        os.replace(f32 + ".tmp", f32)

    ours = securerun(args.threads, root)
    peer_f32 = llamacpp(f32, args.threads)
    peer_q41 = llamacpp(q41, args.threads)
    rows = [
        ("prefill tok/s", ours["prefill_tok_s"], peer_f32["prefill_tok_s"], peer_q41["prefill_tok_s"]),
        ("decode tok/s", ours["decode_tok_s"], peer_f32["decode_tok_s"], peer_q41["decode_tok_s"]),
        ("load s", ours["llm_load_s"], peer_f32["load_s"], peer_q41["load_s"]),
    ]
    print(f"threads={args.threads}, prompt {PREFILL} tokens, {DECODE} greedy decode steps, median of {RUNS}")
    print(f"{'metric':<15} {'securerun f32':>14} {'llama.cpp f32':>14} {'ratio':>7} {'llama.cpp Q4_1':>15}")
    for name, a, b, c in rows:
        print(f"{name:<15} {a:>14.2f} {b:>14.2f} {a / b:>7.2f} {c:>15.2f}")
    print(json.dumps({"threads": args.threads, "securerun": ours, "llamacpp_f32": peer_f32,
                      "llamacpp_q4_1": peer_q41}))


if __name__ == "__main__":
    sys.exit(main())
