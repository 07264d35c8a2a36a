#!/usr/bin/env python3
"""securerun's BERT encoder vs ONNX Runtime on all-MiniLM-L6-v2: sentences/s at batch 1 and 32.

ONNX Runtime runs a graph this script writes from the same safetensors (embeddings, 6 encoder
layers with opset-17 LayerNormalization and opset-20 Gelu, attention with a padding mask), and
checks that its mean-pooled, normalized vectors agree with securerun's before timing anything.
Both sides embed the same 64 sentences (tokenization included), in chunks of the batch size,
with the same number of threads. Every measurement is a fresh process; for each run index every
(engine, batch) cell runs once before the next index; medians of --runs.

Needs: pip install onnxruntime onnx tokenizers numpy   (not needed by CI)
With --dtypes f32,q8_0 securerun is also timed with its weights at those precisions (ONNX Runtime
stays at f32); each precision's vectors are compared with ONNX Runtime's f32 ones first.

Usage: benches/compare_embeddings.py [--runs 5] [--threads 2] [--batches 1,32] [--dtypes f32]
       [--reference]
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, ".cache", "models", "all-minilm-l6-v2")
ONNX = os.path.join(ROOT, ".cache", "bench", "all-minilm-l6-v2.onnx")


def sentences(n):
    # The same sentences as benches/embed.rs.
    words = ("the pump on line seven was inspected after the night shift reported a slow "
             "pressure drop and a faint noise near the outlet valve which the crew replaced").split(" ")
    return [" ".join(words[:4 + (i * 7) % (len(words) - 4)]) + f" {i}." for i in range(n)]


def build_onnx(dst):
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from safetensors.numpy import load_file

    cfg = json.load(open(os.path.join(MODEL, "config.json")))
    w = load_file(os.path.join(MODEL, "model.safetensors"))
    h, heads, layers = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
    d, eps = h // heads, cfg["layer_norm_eps"]
    inits, nodes = [], []

    def const(name, arr):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def node(op, ins, out, **attrs):
        nodes.append(helper.make_node(op, ins, [out], **attrs))
        return out

    def linear(x, prefix, out):
        wt = const(prefix + ".wT", w[prefix + ".weight"].T.astype(np.float32))
        b = const(prefix + ".b", w[prefix + ".bias"].astype(np.float32))
        return node("Add", [node("MatMul", [x, wt], out + "_mm"), b], out)

    def norm(x, prefix, out):
        return node("LayerNormalization", [x, const(prefix + ".g", w[prefix + ".weight"]),
                                           const(prefix + ".b", w[prefix + ".bias"])],
                    out, axis=-1, epsilon=eps)

    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "L"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "L"])
    word = node("Gather", [const("word", w["embeddings.word_embeddings.weight"]), "input_ids"], "we")
    # The first L rows of the position table (L = the batch's sequence length).
    seq = node("Shape", ["input_ids"], "seq", start=1, end=2)
    pos = node("Slice", [const("pos", w["embeddings.position_embeddings.weight"]),
                         const("zero1", np.array([0], dtype=np.int64)), seq,
                         const("axis0", np.array([0], dtype=np.int64))], "pe")
    typ = const("type0", w["embeddings.token_type_embeddings.weight"][0])
    x = norm(node("Add", [node("Add", [word, pos], "wp"), typ], "emb"), "embeddings.LayerNorm", "x0")
    # (1 - mask) * -1e4 as [B, 1, 1, L].
    maskf = node("Cast", ["attention_mask"], "maskf", to=TensorProto.FLOAT)
    bias = node("Mul", [node("Sub", [const("onef", np.array(1.0, dtype=np.float32)), maskf], "inv"),
                        const("neg", np.array(-1e4, dtype=np.float32))], "bias2")
    bias = node("Unsqueeze", [bias, const("axes12", np.array([1, 2], dtype=np.int64))], "bias")
    split = const("split", np.array([0, 0, heads, d], dtype=np.int64))
    merge = const("merge", np.array([0, 0, h], dtype=np.int64))
    scale = const("scale", np.array(1.0 / np.sqrt(d), dtype=np.float32))
    for l in range(layers):
        p = f"encoder.layer.{l}"
        q = node("Transpose", [node("Reshape", [linear(x, f"{p}.attention.self.query", f"q{l}"), split], f"qr{l}")],
                 f"qt{l}", perm=[0, 2, 1, 3])
        k = node("Transpose", [node("Reshape", [linear(x, f"{p}.attention.self.key", f"k{l}"), split], f"kr{l}")],
                 f"kt{l}", perm=[0, 2, 3, 1])
        v = node("Transpose", [node("Reshape", [linear(x, f"{p}.attention.self.value", f"v{l}"), split], f"vr{l}")],
                 f"vt{l}", perm=[0, 2, 1, 3])
        s = node("Add", [node("Mul", [node("MatMul", [q, k], f"s{l}"), scale], f"ss{l}"), bias], f"sb{l}")
        pr = node("Softmax", [s], f"p{l}", axis=-1)
        ctx = node("Reshape", [node("Transpose", [node("MatMul", [pr, v], f"c{l}")], f"ct{l}", perm=[0, 2, 1, 3]),
                               merge], f"cm{l}")
        a = linear(ctx, f"{p}.attention.output.dense", f"o{l}")
        x = norm(node("Add", [a, x], f"r1{l}"), f"{p}.attention.output.LayerNorm", f"x1{l}")
        mid = node("Gelu", [linear(x, f"{p}.intermediate.dense", f"i{l}")], f"g{l}")
        out = linear(mid, f"{p}.output.dense", f"d{l}")
        x = norm(node("Add", [out, x], f"r2{l}"), f"{p}.output.LayerNorm", f"x2{l}")
    nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"]))
    out = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["B", "L", h])
    graph = helper.make_graph(nodes, "minilm", [ids, mask], [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    onnx.checker.check_model(model)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    onnx.save(model, dst)


ORT_CHILD = r"""
import json, sys, time
import numpy as np, onnxruntime as ort
from tokenizers import Tokenizer
model, tok_path, threads, batch, reps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
texts = json.loads(sys.stdin.read())
o = ort.SessionOptions(); o.intra_op_num_threads = threads; o.inter_op_num_threads = 1
sess = ort.InferenceSession(model, o, providers=["CPUExecutionProvider"])
tok = Tokenizer.from_file(tok_path); tok.no_truncation(); tok.no_padding()
def embed(chunk):
    enc = tok.encode_batch(chunk)
    L = max(len(e.ids) for e in enc)
    ids = np.zeros((len(enc), L), np.int64); mask = np.zeros((len(enc), L), np.int64)
    for i, e in enumerate(enc):
        ids[i, :len(e.ids)] = e.ids; mask[i, :len(e.ids)] = 1
    hs = sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    m = mask[:, :, None].astype(np.float32)
    v = (hs * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
embed(texts[:batch])
rates = []
for _ in range(reps):
    t = time.perf_counter()
    for i in range(0, len(texts), batch):
        embed(texts[i:i + batch])
    rates.append(len(texts) / (time.perf_counter() - t))
print(json.dumps({"sentences_s": sorted(rates)[len(rates) // 2],
                  "first": embed(texts[:3]).tolist()}))
"""


def bench_binary():
    out = subprocess.run(["cargo", "bench", "--no-run", "--bench", "embed", "--message-format=json"],
                         cwd=ROOT, check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        m = json.loads(line)
        if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "embed" \
                and m.get("executable"):
            return m["executable"]
    raise RuntimeError("embed bench binary not found")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--dtypes", default="f32", help="securerun's weight precisions, e.g. f32,q8_0")
    ap.add_argument("--reference", action="store_true", help="also time candle-transformers")
    a = ap.parse_args()
    if not os.path.exists(ONNX):
        build_onnx(ONNX)
    binary = bench_binary()
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    texts = sentences(64)
    tok_path = os.path.join(MODEL, "tokenizer.json")

    def ours(batch, engine, field="sentences_s", dtype="f32"):
        out = subprocess.run([binary, "--bench", "--batch", str(batch), "--engine", engine, "--reps", "3",
                              "--dtype", dtype],
                             env=env, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])[field]

    def ort(batch):
        out = subprocess.run([sys.executable, "-c", ORT_CHILD, ONNX, tok_path, str(a.threads), str(batch), "3"],
                             input=json.dumps(texts), check=True, capture_output=True, text=True).stdout
        return json.loads(out)

    # The graph must compute the same vectors before its speed means anything.
    theirs, mine = np.array(ort(1)["first"]), np.array(ours(1, "best", "first"))
    cos = (theirs * mine).sum(1)
    print(f"agreement with ONNX Runtime, cosine of the first three vectors: {cos}")
    if not (cos > 0.9999).all():
        sys.exit("the ONNX graph and securerun disagree; not timing")
    dtypes = a.dtypes.split(",")
    for d in dtypes:
        if d != "f32":
            c = (theirs * np.array(ours(1, "best", "first", d))).sum(1)
            print(f"securerun at {d} against ONNX Runtime at f32, cosine of the first three: {c}")
            if not (c > 0.99).all():
                sys.exit(f"securerun at {d} is too far from f32; not timing")
    engines = [f"securerun {d}" for d in dtypes] + ["onnxruntime"] + (["candle"] if a.reference else [])
    batches = [int(b) for b in a.batches.split(",")]
    samples = {(e, b): [] for e in engines for b in batches}
    for r in range(a.runs):
        for b in batches:
            for e in engines:
                v = ours(b, "best", dtype=e.split()[1]) if e.startswith("securerun") \
                    else ours(b, "reference") if e == "candle" else ort(b)["sentences_s"]
                samples[(e, b)].append(v)
                print(f"run {r} {e} batch {b}: {v:.1f} sentences/s", flush=True)
    print("\n| batch | " + " | ".join(f"securerun {d} | ratio" for d in dtypes) + " | ONNX Runtime f32 |"
          + (" candle |" if a.reference else ""))
    print("|---|" + "---|---|" * len(dtypes) + "---|" + ("---|" if a.reference else ""))
    for b in batches:
        med = {e: float(np.median(samples[(e, b)])) for e in engines}
        row = f"| {b} | " + " | ".join(
            f"{med['securerun ' + d]:.1f} | **{med['securerun ' + d] / med['onnxruntime']:.2f}**"
            for d in dtypes) + f" | {med['onnxruntime']:.1f} |"
        if a.reference:
            row += f" {med['candle']:.1f} |"
        print(row)


if __name__ == "__main__":
    main()
