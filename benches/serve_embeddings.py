#!/usr/bin/env python3
"""Embeddings through `securerun serve` with N concurrent single-sentence clients, against ONNX
Runtime embedding the same sentences in batches of 32 in process (the issue's yardstick).

securerun serves all-MiniLM-L6-v2 as deployed: release build, confined worker, strict sandbox,
durable audit (`--audit-sync fsync`), a token with the embeddings scope; one server per
--dtypes precision, all up at once. A cell: N client threads start together, each sends
--requests requests of one sentence on its own kept-alive connection; sentences/s = all
sentences / (last end - first start). ONNX Runtime runs the graph benches/compare_embeddings.py
writes (f32), batch 32 over the same 64 sentences, tokenization included, same threads. For each
run index every cell runs once (order alternating); medians of --runs.

Usage: benches/serve_embeddings.py [--runs 5] [--clients 32] [--requests 8] [--threads 2]
       [--dtypes f32,q8_0] [--audit-sync fsync]
Not run by CI.
"""
import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare_embeddings as ce  # noqa: E402
import compare_serving as cs  # noqa: E402


def cell(server, clients, requests, texts):
    out = [None] * clients
    barrier = threading.Barrier(clients)

    def client(i):
        c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        barrier.wait()
        t0 = time.perf_counter()
        for r in range(requests):
            body = json.dumps({"model": server.model, "input": texts[(i * requests + r) % len(texts)]})
            c.request("POST", "/v1/embeddings", body,
                      {"content-type": "application/json", **server.headers})
            resp = c.getresponse()
            data = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{resp.status} {data[:200]!r}")
        out[i] = (t0, time.perf_counter())

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if any(o is None for o in out):
        raise RuntimeError("a client failed")
    return clients * requests / (max(o[1] for o in out) - min(o[0] for o in out))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", default="f32,q8_0")
    ap.add_argument("--audit-sync", default="fsync", choices=["fsync", "buffered"])
    a = ap.parse_args()
    if not os.path.exists(ce.ONNX):
        ce.build_onnx(ce.ONNX)
    texts = ce.sentences(64)
    servers = {}
    try:
        for d in a.dtypes.split(","):
            args = argparse.Namespace(slots=4, dtype=d, threads=a.threads, audit_sync=a.audit_sync,
                                      scopes="embeddings")
            servers[d] = cs.Securerun(args, ce.MODEL)
            cell(servers[d], a.clients, 2, texts)  # warm-up

        def ort():
            out = subprocess.run([sys.executable, "-c", ce.ORT_CHILD, ce.ONNX,
                                  os.path.join(ce.MODEL, "tokenizer.json"), str(a.threads), "32", "3"],
                                 input=json.dumps(texts), check=True, capture_output=True,
                                 text=True).stdout
            return json.loads(out)["sentences_s"]

        names = [f"securerun {d}" for d in servers] + ["onnxruntime"]
        samples = {n: [] for n in names}
        for r in range(a.runs):
            order = names if r % 2 == 0 else names[::-1]
            for n in order:
                v = ort() if n == "onnxruntime" else cell(servers[n.split()[1]], a.clients,
                                                          a.requests, texts)
                samples[n].append(v)
                print(f"run {r} {n}: {v:.1f} sentences/s", file=sys.stderr, flush=True)
    finally:
        for s in servers.values():
            s.stop()
    med = {n: statistics.median(v) for n, v in samples.items()}
    print(f"\n{a.clients} concurrent clients x {a.requests} single-sentence requests, "
          f"{a.threads} threads, medians of {a.runs} interleaved runs\n")
    print("| engine | sentences/s | vs ONNX Runtime batch 32 |")
    print("|---|---|---|")
    for n in names:
        print(f"| {n} | {med[n]:.1f} | {med[n] / med['onnxruntime']:.2f} |")


if __name__ == "__main__":
    main()
