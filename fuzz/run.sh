#!/usr/bin/env bash
# Runs every fuzz target for FUZZ_SECONDS (default 600) each, on the nightly toolchain, and
# prints one line per target with its executions and any crash found.
#   fuzz/run.sh [target ...]
set -euo pipefail
cd "$(dirname "$0")"
seconds="${FUZZ_SECONDS:-600}"
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(csr jwt selector spiffe_id bundle extension)
command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz is missing: cargo install cargo-fuzz" >&2; exit 1; }
rustup run nightly rustc --version >/dev/null 2>&1 || { echo "the nightly toolchain is missing: rustup toolchain install nightly" >&2; exit 1; }
[ -d corpus ] || ./make-corpus.sh
mkdir -p logs
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    if cargo +nightly fuzz run "$t" "corpus/$t" -- -max_total_time="$seconds" -rss_limit_mb=2048 \
        >"logs/$t.log" 2>&1; then
        result=ok
    else
        result="FAILED (see fuzz/logs/$t.log and fuzz/artifacts/$t/)"
    fi
    stats=$(grep -E '^Done [0-9]+ runs' "logs/$t.log" | tail -1 || true)
    echo "$t: $result; ${stats:-no summary}; corpus $(ls "corpus/$t" | wc -l) inputs"
done
