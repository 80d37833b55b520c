#!/usr/bin/env bash
# The test suite: fetch the real datasets the tests read (into $ASGE_DATA, default ./data; a second run only
# re-checks the checksums), then run every test in release mode (the tests train real models).
set -euo pipefail
cd "$(dirname "$0")/.."
export ASGE_DATA=${ASGE_DATA:-$PWD/data}
tools/fetch-datasets.sh "$ASGE_DATA" mnist fashion-mnist cifar10
cargo test --release --all-targets
