#!/usr/bin/env bash
# Everything CI checks: formatting, lints, then every test (unit and integration). The
# integration tests run the built binaries, so the whole workspace is built first.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo build --workspace --quiet
cargo test --workspace --no-fail-fast
