#!/usr/bin/env bash
# The main job on a real model: fetch SmolLM2-135M-Instruct, build securerun, inspect the model,
# pack it into one self-contained file, sign it with a site key, chat with it (verified, in the
# confined worker), then serve it over the OpenAI-compatible API with an access token and call it.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/fetch-models.sh
cargo build --release
bin=./target/release/securerun
model=.cache/models/smollm2-135m-instruct
packed=.cache/models/smollm2.safetensors
keys=.cache/keys
mkdir -p "$keys"
[ -f "$keys/site.key" ] || $bin keygen --out "$keys/site"

$bin inspect "$model" | head -12
$bin pack "$model" --out "$packed" --force
$bin sign "$packed" --key "$keys/site.key"
$bin verify "$packed" --trust-key "$keys/site.pub"
echo "--- securerun run (greedy) ---"
$bin run "$packed" --trust-key "$keys/site.pub" --prompt "The capital of France is" \
  --max-tokens 16 --temperature 0
echo
echo "--- securerun run --chat ---"
$bin run "$packed" --trust-key "$keys/site.pub" --chat \
  --prompt "${1:-What is the capital of France?}" --max-tokens 64 --temperature 0 --verbose

echo
echo "--- securerun doctor ---"
$bin doctor
echo "--- securerun serve + curl ---"
state=$(mktemp -d)
token=$($bin token create --name demo --scopes inference --state-dir "$state" | tail -1)
$bin serve "$packed" --trust-key "$keys/site.pub" --state-dir "$state" --listen 127.0.0.1:8080 \
  > "$state/serve.out" 2> "$state/serve.log" &
server=$!
trap 'kill $server 2>/dev/null; rm -rf "$state"' EXIT
for _ in $(seq 50); do grep -q listening "$state/serve.out" && break; sleep 0.2; done
curl -s http://127.0.0.1:8080/v1/chat/completions -H "Authorization: Bearer $token" \
  -d '{"model": "smollm2", "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 32, "temperature": 0}'
echo
