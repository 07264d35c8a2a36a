#!/usr/bin/env bash
# The audit writer, an older build next to this one, interleaved, medians.
#
#   benches/audit_compare.sh OLD_COMMIT [ROUNDS] [SECONDS]
#
# Builds `benches/audit.rs` (which compiles against either version of the writer) at
# OLD_COMMIT in a worktree with its own target directory, and at HEAD, then runs them in turn
# ROUNDS times (default 5) and prints the median of each figure. Not run in CI.
set -euo pipefail
old=${1:?usage: benches/audit_compare.sh OLD_COMMIT [ROUNDS] [SECONDS]}
rounds=${2:-5}
seconds=${3:-3}
root=$(git rev-parse --show-toplevel)
work=${AUDIT_COMPARE_DIR:-/tmp/securerun-audit-compare}
mkdir -p "$work"
if [ ! -d "$work/old" ]; then
  git -C "$root" worktree add -f "$work/old" "$old" >/dev/null
fi
cp "$root/benches/audit.rs" "$work/old/benches/audit.rs"
grep -q 'name = "audit"' "$work/old/Cargo.toml" || cat >> "$work/old/Cargo.toml" <<'TOML'

[[bench]]
name = "audit"
harness = false
TOML
(cd "$work/old" && CARGO_TARGET_DIR="$work/old-target" cargo build --release --bench audit -q)
(cd "$root" && cargo build --release --bench audit -q)
newest() { ls -t "$1"/release/deps/audit-* | grep -v '\.d$' | head -1; }
old_bin=$(newest "$work/old-target")
new_bin=$(newest "$root/target")
out="$work/results.jsonl"
: > "$out"
for i in $(seq "$rounds"); do
  echo "{\"build\": \"old\", \"r\": $("$old_bin" "$seconds")}" >> "$out"
  echo "{\"build\": \"new\", \"r\": $("$new_bin" "$seconds")}" >> "$out"
done
python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
keys = list(rows[0]["r"].keys())
print(f"{'':28} {'old':>10} {'new':>10}")
for k in keys:
    med = {b: statistics.median(r["r"][k] for r in rows if r["build"] == b) for b in ("old", "new")}
    print(f"{k:28} {med['old']:>10.1f} {med['new']:>10.1f}")
PY
