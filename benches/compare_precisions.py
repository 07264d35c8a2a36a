#!/usr/bin/env python3
"""securerun vs llama.cpp at every precision, same weights, same threads, interleaved runs.

Models:
  * SmolLM2-135M (real): securerun runs the f32 safetensors that scripts/convert_smollm2.py made
    from the packaged Q4_1 GGUF; llama.cpp runs an F32 GGUF of those same values, and its own
    quantizations of it (llama_model_quantize): BF16, F16, Q8_0, Q4_0, Q4_K_M.
  * a 1.1B llama (TinyLlama's shape: 2048 hidden, 22 layers, 32 heads, 4 KV heads, 5632
    intermediate; SmolLM2's 49,152-token vocabulary so both sides have a real tokenizer) with
    random weights, written as bf16 safetensors for securerun and a GGUF of the same values
    (Q and K rows permuted as llama.cpp's converter does) for llama.cpp.

Every measurement is a fresh process (load time and peak RSS are per process); for each run
index every (engine, precision, threads) cell runs once before the next index: interleaved.
Medians of --runs (default 5).

Needs: pip install llama-cpp-python gguf numpy   (not needed by CI)
Usage: benches/compare_precisions.py [--runs 5] [--sizes small,1b] [--threads 1,2]
       [--dtypes f32,bf16,f16,q8_0,q4_0,q4_k] [--prefill 128,512] [--decode 64] [--json OUT]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
import zlib

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, ".cache", "models")
TEXT = "The history of the city begins with a small settlement by the river. " * 400

# Our precision -> (llama.cpp file type name, llama_ftype value)
LLAMA_TYPES = {
    "f32": ("F32", 0),
    "f16": ("F16", 1),
    "bf16": ("BF16", 32),
    "q8_0": ("Q8_0", 7),
    "q4_0": ("Q4_0", 2),
    "q4_k": ("Q4_K_M", 15),
}


# ---------------------------------------------------------------- model preparation

def copy_fields(reader, writer, file_type):
    import gguf
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name == "general.file_type":
            writer.add_key_value(name, file_type, gguf.GGUFValueType.UINT32)
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub)


def make_f32_gguf(src, dst):
    import gguf
    from gguf.quants import dequantize
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
    copy_fields(reader, writer, 0)
    for t in reader.tensors:
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        writer.add_tensor(t.name, w.reshape([int(x) for x in reversed(t.shape.tolist())]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantize_gguf(src, dst, ftype):
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count()
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize {dst}: {rc}")


def permute_qk(w, n_head):
    # HF rotates halves; llama.cpp rotates pairs: its converter permutes Q and K rows.
    d, k = w.shape
    return w.reshape(n_head, 2, d // n_head // 2, k).swapaxes(1, 2).reshape(d, k)


SHAPES = {
    # hidden, intermediate, layers, heads, kv heads, vocabulary
    "1b": (2048, 5632, 22, 32, 4, 49152),   # TinyLlama 1.1B's shape
    "7b": (4096, 11008, 32, 32, 32, 49152),  # Llama 2 7B's shape
}


def make_random(dir_, gguf_path, smol_gguf, size="1b"):
    """Random llama-shaped weights: bf16 safetensors (+ a GGUF of the same values if
    `gguf_path`). Tensors are generated one at a time and written as they come, so a 7B model
    needs memory for one tensor, not the model."""
    import gguf
    hid, inter, layers, heads, kv_heads, vocab = SHAPES[size]
    head_dim = hid // heads
    specs = [("model.embed_tokens.weight", (vocab, hid)), ("model.norm.weight", (hid,)),
             ("lm_head.weight", (vocab, hid))]
    for i in range(layers):
        p = f"model.layers.{i}"
        specs += [(f"{p}.input_layernorm.weight", (hid,)),
                  (f"{p}.post_attention_layernorm.weight", (hid,)),
                  (f"{p}.self_attn.q_proj.weight", (hid, hid)),
                  (f"{p}.self_attn.k_proj.weight", (kv_heads * head_dim, hid)),
                  (f"{p}.self_attn.v_proj.weight", (kv_heads * head_dim, hid)),
                  (f"{p}.self_attn.o_proj.weight", (hid, hid)),
                  (f"{p}.mlp.gate_proj.weight", (inter, hid)),
                  (f"{p}.mlp.up_proj.weight", (inter, hid)),
                  (f"{p}.mlp.down_proj.weight", (hid, inter))]
    specs.sort()

    def tensor(name, shape):
        if len(shape) == 1:
            return np.ones(shape, np.float32)
        # A fixed seed per tensor: both files get the same values, bf16-exact.
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        w = rng.standard_normal(shape, dtype=np.float32) * 0.02
        return (w.view(np.uint32) & 0xFFFF0000).view(np.float32)

    os.makedirs(dir_, exist_ok=True)
    # safetensors, bf16 (norms too: securerun widens vectors to f32)
    header, offset = {}, 0
    for name, shape in specs:
        n = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    tmp = os.path.join(dir_, "model.safetensors.tmp")
    with open(tmp, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for name, shape in specs:
            f.write((tensor(name, shape).view(np.uint32) >> 16).astype(np.uint16).tobytes())
    os.replace(tmp, os.path.join(dir_, "model.safetensors"))
    smol = os.path.join(CACHE, "smollm2-135m-instruct")
    cfg = json.load(open(os.path.join(smol, "config.json")))
    cfg.update({"hidden_size": hid, "intermediate_size": inter, "num_hidden_layers": layers,
                "num_attention_heads": heads, "num_key_value_heads": kv_heads,
                "head_dim": head_dim, "tie_word_embeddings": False,
                "max_position_embeddings": 2048, "rope_theta": 10000.0})
    json.dump(cfg, open(os.path.join(dir_, "config.json"), "w"))
    for name in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]:
        with open(os.path.join(smol, name), "rb") as a, open(os.path.join(dir_, name), "wb") as b:
            b.write(a.read())
    if gguf_path is None:
        return

    # GGUF: SmolLM2's tokenizer metadata, this shape, same values (BF16 tensors)
    reader = gguf.GGUFReader(smol_gguf)
    writer = gguf.GGUFWriter(gguf_path + ".tmp", "llama")
    shape_keys = {
        "llama.embedding_length": hid, "llama.feed_forward_length": inter,
        "llama.block_count": layers, "llama.attention.head_count": heads,
        "llama.attention.head_count_kv": kv_heads, "llama.context_length": 2048,
        "llama.rope.dimension_count": head_dim, "llama.rope.freq_base": 10000.0,
    }
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in shape_keys:
            continue
        if name == "general.file_type":
            writer.add_key_value(name, 32, gguf.GGUFValueType.UINT32)
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub)
    for k, v in shape_keys.items():
        vt = gguf.GGUFValueType.FLOAT32 if isinstance(v, float) else gguf.GGUFValueType.UINT32
        writer.add_key_value(k, v, vt)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                 "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, shape in specs:
        w = tensor(name, shape)
        if name in names:
            out = names[name]
        else:
            _, _, i, *rest = name.split(".")
            key = ".".join(rest[:-1])
            out = f"blk.{i}.{per_layer[key]}.weight"
        if name.endswith("q_proj.weight"):
            w = permute_qk(w, heads)
        elif name.endswith("k_proj.weight"):
            w = permute_qk(w, kv_heads)
        if w.ndim == 1:
            writer.add_tensor(out, w.astype(np.float32))
        else:
            bits = (w.view(np.uint32) >> 16).astype(np.uint16)
            writer.add_tensor(out, bits, raw_dtype=gguf.GGMLQuantizationType.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(gguf_path + ".tmp", gguf_path)


def prepare(sizes, dtypes):
    """Returns {size: (securerun model dir, {dtype: gguf path})}."""
    out = {}
    q41 = os.path.join(CACHE, "SmolLM2-135M-Instruct.Q4_1.gguf")
    if "small" in sizes:
        f32 = os.path.join(CACHE, "SmolLM2-135M-Instruct.F32.gguf")
        if not os.path.exists(f32):
            make_f32_gguf(q41, f32 + ".tmp")
            os.replace(f32 + ".tmp", f32)
        ggufs = {}
        for d in dtypes:
            name, ftype = LLAMA_TYPES[d]
            path = f32 if d == "f32" else os.path.join(CACHE, f"SmolLM2-135M-Instruct.{name}.gguf")
            if not os.path.exists(path):
                quantize_gguf(f32, path, ftype)
            ggufs[d] = path
        out["small"] = (os.path.join(CACHE, "smollm2-135m-instruct"), ggufs)
    if "1b" in sizes:
        dir_ = os.path.join(CACHE, "llama-1.1b-random")
        base = os.path.join(CACHE, "llama-1.1b-random.BF16.gguf")
        if not os.path.exists(os.path.join(dir_, "model.safetensors")) or not os.path.exists(base):
            make_random(dir_, base, q41, "1b")
        ggufs = {}
        for d in dtypes:
            name, ftype = LLAMA_TYPES[d]
            path = base if d == "bf16" else os.path.join(CACHE, f"llama-1.1b-random.{name}.gguf")
            if not os.path.exists(path):
                quantize_gguf(base, path, ftype)
            ggufs[d] = path
        out["1b"] = (dir_, ggufs)
    if "7b" in sizes:
        # securerun only: does a 7B model at q4_0 fit the worker's budget on a 24 GB machine.
        dir_ = os.path.join(CACHE, "llama-7b-random")
        if not os.path.exists(os.path.join(dir_, "model.safetensors")):
            make_random(dir_, None, q41, "7b")
        out["7b"] = (dir_, {})
    return out


# ---------------------------------------------------------------- one measurement per process

LLAMA_CHILD = r"""
import json, sys, time, resource
import numpy as np
from llama_cpp import Llama
path, threads, prefill, decode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
t0 = time.perf_counter()
n_ctx = max(1024, prefill + decode + 8)
llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
            n_batch=n_ctx, logits_all=False, verbose=False)
load_s = time.perf_counter() - t0
text = "The history of the city begins with a small settlement by the river. " * 400
tokens = llm.tokenize(text.encode(), add_bos=False, special=False)[:prefill]
t0 = time.perf_counter()
llm.eval(tokens)
prefill_s = time.perf_counter() - t0
tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
t0 = time.perf_counter()
for _ in range(decode - 1):
    llm.eval([tok])
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
decode_s = time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
print(json.dumps({"engine": "llama.cpp", "load_s": load_s, "prefill_tok_s": len(tokens) / prefill_s,
                  "decode_tok_s": (decode - 1) / decode_s, "peak_rss_mb": rss}))
"""


def bench_binary():
    subprocess.run(["cargo", "build", "--release", "--quiet", "--bench", "decode"], cwd=ROOT, check=True)
    out = subprocess.run(["cargo", "bench", "--no-run", "--bench", "decode", "--message-format=json"],
                         cwd=ROOT, check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        m = json.loads(line)
        if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "decode" \
                and m.get("executable"):
            return m["executable"]
    raise RuntimeError("decode bench binary not found")


def run_ours(binary, model, dtype, threads, prefill, decode, confined=False):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    cmd = [binary, "--bench", "--model", model, "--dtype", dtype, "--prefill", str(prefill),
           "--decode", str(decode)] + (["--confined"] if confined else [])
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_llama(path, threads, prefill, decode):
    out = subprocess.run([sys.executable, "-c", LLAMA_CHILD, path, str(threads), str(prefill), str(decode)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--sizes", default="small,1b")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--dtypes", default="f32,bf16,f16,q8_0,q4_0,q4_k")
    ap.add_argument("--prefill", default="128,512")
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--confined", action="store_true", help="also time securerun's confined worker")
    ap.add_argument("--json", help="write every sample here")
    args = ap.parse_args()
    sizes = args.sizes.split(",")
    dtypes = args.dtypes.split(",")
    threads = [int(t) for t in args.threads.split(",")]
    prefills = [int(p) for p in args.prefill.split(",")]

    models = prepare(sizes, dtypes)
    binary = bench_binary()
    cells = []
    for size in sizes:
        for d in dtypes:
            for t in threads:
                for p in prefills:
                    # Decode is measured in the first prefill's cell only.
                    dec = args.decode if p == prefills[0] else 2
                    cells.append((size, d, t, p, dec, "securerun"))
                    if args.confined:
                        cells.append((size, d, t, p, dec, "securerun-confined"))
                    if d in models[size][1]:
                        cells.append((size, d, t, p, dec, "llama.cpp"))
    samples = {c: [] for c in cells}
    for r in range(args.runs):
        for c in cells:
            size, d, t, p, dec, engine = c
            model_dir, ggufs = models[size]
            try:
                if engine == "llama.cpp":
                    s = run_llama(ggufs[d], t, p, dec)
                else:
                    s = run_ours(binary, model_dir, d, t, p, dec, engine.endswith("confined"))
            except subprocess.CalledProcessError as e:
                print(f"failed: {c}: {e.stderr[-400:]}", file=sys.stderr)
                continue
            samples[c].append(s)
            print(f"run {r} {c}: prefill {s['prefill_tok_s']:.1f} decode {s['decode_tok_s']:.1f} "
                  f"load {s['load_s']:.2f}s rss {s['peak_rss_mb']} MB", file=sys.stderr, flush=True)

    def med(c, k):
        v = [s[k] for s in samples.get(c, [])]
        return float(np.median(v)) if v else float("nan")

    print(f"medians of {args.runs} interleaved runs; prefill N tokens, {args.decode} greedy decode steps")
    print(f"{'model':<6} {'dtype':<5} {'thr':>3} {'metric':<14} {'securerun':>10} {'llama.cpp':>10} {'ratio':>6}")
    for size in sizes:
        for d in dtypes:
            for t in threads:
                rows = []
                for p in prefills:
                    a, b = (size, d, t, p, args.decode if p == prefills[0] else 2, "securerun"), None
                    b = a[:5] + ("llama.cpp",)
                    rows.append((f"prefill {p}", med(a, "prefill_tok_s"), med(b, "prefill_tok_s")))
                    if p == prefills[0]:
                        rows.append(("decode", med(a, "decode_tok_s"), med(b, "decode_tok_s")))
                        rows.append(("load s", med(a, "load_s"), med(b, "load_s")))
                        rows.append(("peak RSS MB", med(a, "peak_rss_mb"), med(b, "peak_rss_mb")))
                        if args.confined:
                            cc = a[:5] + ("securerun-confined",)
                            rows.append(("decode confined", med(cc, "decode_tok_s"), med(a, "decode_tok_s")))
                for name, x, y in rows:
                    ratio = x / y if y == y and y else float("nan")
                    print(f"{size:<6} {d:<5} {t:>3} {name:<14} {x:>10.2f} {y:>10.2f} {ratio:>6.2f}")
    if args.json:
        json.dump({"|".join(map(str, c)): v for c, v in samples.items()}, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    sys.exit(main())
