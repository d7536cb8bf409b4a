#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what it needs, then lint, Rust tests,
# the Python package, type checks and pytest. Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "install build and test tools"
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    "maturin>=1.7,<2" pytest numpy safetensors hypothesis mypy ruff types-PyYAML psutil

step "install the torch extra (CPU tests of the torch engine), transformers and accelerate (FP8 loading), peft (adapters)"
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    "torch>=2.2" "transformers>=4.40" accelerate peft

step "install the ray extra (merges and sweeps on a local Ray cluster in the tests)"
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "ray>=2.9"

step "rust: format and lint"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

step "rust: tests"
cargo test -p mergex-core --locked

step "python: build and install mergex"
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --force-reinstall --no-deps .
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore .

step "python: lint and types"
ruff check python tests benches examples scripts
ruff format --check python tests benches examples scripts
mypy
python3 -m mypy.stubtest mergex._mergex

step "python: tests"
python3 -m pytest -q "$@"
