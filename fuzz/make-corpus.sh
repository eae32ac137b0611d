#!/usr/bin/env bash
# Writes the seed corpus (fuzz/corpus/<target>/seed-N) from the same seeds the stable smoke
# run uses (tests/tests/fuzz_smoke.rs), so both start from well-formed inputs.
set -euo pipefail
cd "$(dirname "$0")/.."
AGENTD_FUZZ_WRITE_CORPUS="$PWD/fuzz/corpus" AGENTD_FUZZ_SMOKE_ROUNDS=0 \
    cargo test -q -p agentd-e2e --test fuzz_smoke
