#!/usr/bin/env python3
"""Serving side by side: securerun serve vs llama.cpp's llama-server, same weights, same threads,
same number of parallel slots, N concurrent streaming clients.

Both servers run at once (an idle server takes no CPU); for each run index every (clients, engine)
cell is measured once before the next index (interleaved, the engine order alternating), and the
table reports medians of --runs. A cell: N clients start together, each streams one completion
(`/v1/completions`, greedy, max_tokens M, its own counting prompt so that no client hits an
end-of-sequence token early, and never the same prompt twice so that no prompt cache serves a
whole prompt; --shared-prefix puts the same WORDS-word preamble before each); measured per cell:
  * aggregate generated tokens/s = all completion tokens / (last end - first start),
  * p50 time to first token (request sent -> first non-empty text chunk) over the clients,
  * the ratio of aggregate tokens/s to the same engine's 1-client decode.

securerun runs the SmolLM2-135M safetensors (or the random 1.1B llama) confined, as deployed
(--sandbox strict, unsigned model allowed for the bench) at --dtype; llama-server runs the GGUF of
the same values at the matching type (made by benches/compare_precisions.py).

llama-server is built once from the llama-cpp-python sdist's vendored llama.cpp (cmake, ~10 min on
2 cores) into .cache/bench/llama-server.

Usage: benches/compare_serving.py [--runs 3] [--clients 1,4,8] [--dtype q8_0] [--size small]
       [--threads 2] [--slots 8] [--max-tokens 64] [--audit-sync fsync] [--shared-prefix WORDS]
       [--json OUT]
Not run by CI.
"""
import argparse
import glob
import hashlib
import http.client
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, ".cache")
MODELS = os.path.join(CACHE, "models")
LLAMA_SERVER = os.path.join(CACHE, "bench", "llama-server")
LLAMA_CPP_SDIST = "llama_cpp_python-0.3.36.tar.gz"

GGUF_TYPE = {"f32": "F32", "bf16": "BF16", "f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k": "Q4_K_M"}
SIZES = {
    "small": ("smollm2-135m-instruct", "SmolLM2-135M-Instruct"),
    "1b": ("llama-1.1b-random", "llama-1.1b-random"),
}


def ensure_llama_server():
    if os.path.exists(LLAMA_SERVER):
        return LLAMA_SERVER
    work = tempfile.mkdtemp(prefix="llama-build-")
    # The sdist from PyPI's simple index, checked against the sha256 the index gives.
    index = urllib.request.urlopen("https://pypi.org/simple/llama-cpp-python/", timeout=60).read()
    url = re.search(r'href="([^"]*/' + re.escape(LLAMA_CPP_SDIST) + r'#sha256=([0-9a-f]{64}))"',
                    index.decode()).group(1)
    data = urllib.request.urlopen(url.split("#")[0], timeout=600).read()
    if hashlib.sha256(data).hexdigest() != url.rsplit("=", 1)[1]:
        sys.exit(f"{LLAMA_CPP_SDIST}: sha256 mismatch")
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        t.extractall(work, filter="data")
    src = glob.glob(os.path.join(work, "llama_cpp_python-*", "vendor", "llama.cpp"))[0]
    build = os.path.join(work, "build")
    # cmake from PATH, or the one `pip install cmake` put beside this Python.
    cmake = shutil.which("cmake") or os.path.join(os.path.dirname(sys.executable), "cmake")
    subprocess.run([cmake, "-S", src, "-B", build, "-DCMAKE_BUILD_TYPE=Release",
                    "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF",
                    # Native minus AMX: ggml's AMX path segfaults at the first decode on this
                    # VM (tile state not granted); AVX-512 with VNNI and BF16 as on this CPU.
                    "-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON",
                    "-DGGML_F16C=ON", "-DGGML_AVX512=ON", "-DGGML_AVX512_VNNI=ON",
                    "-DGGML_AVX512_BF16=ON", "-DGGML_AVX512_VBMI=ON",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                    "-DLLAMA_BUILD_SERVER=ON"], check=True)
    subprocess.run([cmake, "--build", build, "--target", "llama-server", "-j",
                    str(os.cpu_count() or 2)], check=True)
    os.makedirs(os.path.dirname(LLAMA_SERVER), exist_ok=True)
    shutil.copy(os.path.join(build, "bin", "llama-server"), LLAMA_SERVER)
    shutil.rmtree(work, ignore_errors=True)
    return LLAMA_SERVER


def wait_http(port, path, timeout=600):
    until = time.time() + timeout
    while time.time() < until:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", path)
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server on {port} did not come up")


class Securerun:
    name = "securerun"

    def __init__(self, args, model_dir):
        subprocess.run(["cargo", "build", "--release", "--bin", "securerun"], cwd=ROOT, check=True)
        self.bin = os.path.join(ROOT, "target", "release", "securerun")
        self.state = tempfile.mkdtemp(prefix="bench-state-")
        os.chmod(self.state, 0o700)
        cfg = os.path.join(self.state, "serve.toml")
        with open(cfg, "w") as f:
            f.write(f'listen = "127.0.0.1:0"\nmax_sequences = {args.slots}\nqueue = 256\n'
                    f"max_tokens_cap = 4096\ngeneration_timeout = 600\nsend_timeout = 60\n")
        self.proc = subprocess.Popen(
            [self.bin, "serve", model_dir, "--allow-unsigned", "--dtype", args.dtype,
             "--threads", str(args.threads), "--state-dir", self.state, "--config", cfg,
             "--audit-sync", args.audit_sync],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("listening on"):
            raise RuntimeError(f"securerun did not start: {line!r}")
        self.port = int(line.split()[2].rsplit(":", 1)[1])
        self.model = line.split("(models ")[1].rstrip(")\n").split(",")[0]
        out = subprocess.run(
            [self.bin, "token", "create", "--name", "bench",
             "--scopes", getattr(args, "scopes", "inference"),
             "--rate", "100000/min", "--tokens-per-min", "100000000", "--state-dir", self.state],
            capture_output=True, text=True, check=True)
        self.headers = {"authorization": "Bearer " + out.stdout.strip().splitlines()[-1]}
        time.sleep(1)

    def stop(self):
        self.proc.terminate()
        self.proc.wait()
        shutil.rmtree(self.state, ignore_errors=True)


class LlamaServer:
    name = "llama-server"

    def __init__(self, args, gguf):
        port = 18000 + os.getpid() % 1000
        self.proc = subprocess.Popen(
            [ensure_llama_server(), "-m", gguf, "-t", str(args.threads), "-tb", str(args.threads),
             "-np", str(args.slots), "-c", str(args.slots * 1024), "--host", "127.0.0.1",
             "--port", str(port), "-ngl", "0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.port = port
        self.model = os.path.basename(gguf)
        self.headers = {}
        wait_http(port, "/health")

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


# A system prompt of sorts, shared by every request with --shared-prefix WORDS.
PREFIX_WORDS = ("You answer questions about the ledger of a small clinic using only the records "
                "given below and say so when a record is missing ").split()


def prompt(i, run, shared_prefix):
    """Client i's prompt in run `run`: a counting sequence of its own, never the same twice (so
    a prompt cache cannot serve a whole prompt), after `shared_prefix` words shared by all."""
    start = 1 + 37 * i + 1000 * (run + 1)
    words = (PREFIX_WORDS * (shared_prefix // len(PREFIX_WORDS) + 1))[:shared_prefix]
    head = " ".join(words) + "\n" if words else ""
    return head + ", ".join(str(n) for n in range(start, start + 12)) + ","


def one_stream(server, i, max_tokens, out, barrier, text):
    body = json.dumps({"model": server.model, "prompt": text, "max_tokens": max_tokens,
                       "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
    barrier.wait()
    t0 = time.perf_counter()
    c.request("POST", "/v1/completions", body,
              {"content-type": "application/json", **server.headers})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"{server.name}: {r.status} {r.read()[:200]!r}")
    first, chunks, usage = None, 0, None
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        ev = json.loads(line[6:])
        if ev.get("usage"):
            usage = ev["usage"].get("completion_tokens")
        for ch in ev.get("choices") or []:
            if ch.get("text"):
                chunks += 1
                if first is None:
                    first = time.perf_counter()
    t1 = time.perf_counter()
    out[i] = (t0, t1, (first or t1) - t0, usage if usage else chunks)


def cell(server, clients, max_tokens, run, shared_prefix):
    out = [None] * clients
    barrier = threading.Barrier(clients)
    threads = [threading.Thread(target=one_stream,
                                args=(server, i, max_tokens, out, barrier,
                                      prompt(i, run, shared_prefix)))
               for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if any(o is None for o in out):
        raise RuntimeError(f"{server.name}: a client failed")
    start = min(o[0] for o in out)
    end = max(o[1] for o in out)
    tokens = sum(o[3] for o in out)
    return {"tok_s": tokens / (end - start), "ttft_ms": 1000 * statistics.median(o[2] for o in out),
            "tokens": tokens}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--dtype", default="q8_0", choices=sorted(GGUF_TYPE))
    ap.add_argument("--size", default="small", choices=sorted(SIZES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--audit-sync", default="fsync", choices=["fsync", "buffered"],
                    help="securerun's audit durability (fsync: every record on disk before "
                         "the request acts, the default and what the table reports)")
    ap.add_argument("--shared-prefix", type=int, default=0, metavar="WORDS",
                    help="a prefix of WORDS words that every prompt shares (a system prompt): "
                         "measures prefix reuse")
    ap.add_argument("--json")
    args = ap.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    model_dir, stem = SIZES[args.size]
    gguf = os.path.join(MODELS, f"{stem}.{GGUF_TYPE[args.dtype]}.gguf")
    if not os.path.exists(gguf):
        sys.exit(f"{gguf} is missing: run benches/compare_precisions.py --sizes {args.size} "
                 f"--dtypes {args.dtype} once to make it")
    ensure_llama_server()
    servers = [Securerun(args, os.path.join(MODELS, model_dir)), LlamaServer(args, gguf)]
    try:
        for s in servers:  # warm-up: first request, page faults, thread pools
            cell(s, 1, 8, -1, args.shared_prefix)
        results = {(s.name, c): [] for s in servers for c in clients}
        for run in range(args.runs):
            for c in clients:
                order = servers if (run + c) % 2 == 0 else servers[::-1]
                for s in order:
                    r = cell(s, c, args.max_tokens, run * len(clients) + clients.index(c),
                             args.shared_prefix)
                    results[(s.name, c)].append(r)
                    print(f"run {run} {s.name:12} clients {c}: {r['tok_s']:7.1f} tok/s, "
                          f"TTFT p50 {r['ttft_ms']:7.1f} ms", file=sys.stderr)
    finally:
        for s in servers:
            s.stop()
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("tok_s", "ttft_ms")}
           for k, v in results.items()}
    print(f"\n{args.size} {args.dtype}, {args.threads} threads, {args.slots} slots, "
          f"{args.max_tokens} tokens per client, shared prefix {args.shared_prefix} words, "
          f"medians of {args.runs} interleaved runs\n")
    print("| clients | securerun tok/s | llama-server tok/s | ratio | securerun TTFT p50 ms | "
          "llama-server TTFT p50 ms | securerun vs its 1 client |")
    print("|---|---|---|---|---|---|---|")
    for c in clients:
        ours, theirs = med[("securerun", c)], med[("llama-server", c)]
        own = ours["tok_s"] / med[("securerun", clients[0])]["tok_s"]
        print(f"| {c} | {ours['tok_s']:.1f} | {theirs['tok_s']:.1f} | "
              f"{ours['tok_s'] / theirs['tok_s']:.2f} | {ours['ttft_ms']:.0f} | "
              f"{theirs['ttft_ms']:.0f} | {own:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{k[0]}/{k[1]}": v for k, v in results.items()}, f, indent=1)


if __name__ == "__main__":
    main()
