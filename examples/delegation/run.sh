#!/usr/bin/env bash
# The delegation flow, end to end, on one machine:
#
#   alice grants an orchestrator agent calendar:* and crm:read (depth 1);
#   the orchestrator delegates calendar:read to a scheduler agent (token exchange);
#   a tool server built on agentd's verifier allows the scheduler's calendar:read call and
#   refuses its crm:read and payments:execute calls, saying why.
#
# Two node agents stand for two hosts: the orchestrator runs on n1, the scheduler on n2
# (both as the current user). `make demo-delegation` runs this script.
#
# Environment: AGENTD_BIN (the agentd binary), EXAMPLES_BIN_DIR (where
# delegation-tool-server and delegation-agent-call are), both defaulting to target/debug;
# TMPDIR (where the temp dir goes, default /tmp).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
BIN="${AGENTD_BIN:-$TARGET/debug/agentd}"
EX="${EXAMPLES_BIN_DIR:-$TARGET/debug}"
DEMO="$(mktemp -d "${TMPDIR:-/tmp}/agentd-deleg.XXXXXX")"
ADMIN="$DEMO/admin.sock"
# The processes this script started in the background: their own pids (each is started
# directly with `&`, so `$!` is the process itself, not a subshell running a function).
PIDS=()

# On every exit (success, an error under set -e, or a signal): stop what we started, wait
# until it has exited (SIGKILL after 10 s), and remove the temp dir.
cleanup() {
    local status=$? pid
    trap - EXIT INT TERM HUP
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    PIDS=()
    rm -rf "$DEMO"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

step() { printf '\n== %s\n' "$*"; }
agentd() { "$BIN" "$@"; }
wait_for() { # wait_for CMD...: up to 20 s
    for _ in $(seq 200); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "timed out waiting for: $*" >&2; return 1
}
json_field() { sed -E "s/.*\"$1\":\"([^\"]+)\".*/\1/"; }

step "Server"
"$BIN" server run --data-dir "$DEMO/server" --bind-address 127.0.0.1:0 \
    --admin-socket "$ADMIN" >"$DEMO/server.log" 2>&1 &
PIDS+=($!)
wait_for agentd healthcheck --admin-socket "$ADMIN"
ADDR="$(agentd healthcheck --admin-socket "$ADMIN" --output json | json_field node_api_address)"
agentd bundle show --admin-socket "$ADMIN" >"$DEMO/bundle.pem"

for n in n1 n2; do
    step "Node agent $n"
    TOKEN="$(agentd token generate --spiffe-id "spiffe://example.org/node/$n" --admin-socket "$ADMIN")"
    "$BIN" node run --server-address "$ADDR" --join-token "$TOKEN" --trust-bundle "$DEMO/bundle.pem" \
        --data-dir "$DEMO/$n" --socket-path "$DEMO/$n.sock" --sync-interval 1s >"$DEMO/$n.log" 2>&1 &
    PIDS+=($!)
    wait_for agentd healthcheck --socket-path "$DEMO/$n.sock"
done

ORCH=spiffe://example.org/agent/orchestrator
SCHED=spiffe://example.org/agent/scheduler
TOOL=spiffe://example.org/tool/workspace
step "Entries: the scope ceilings"
agentd entry create --admin-socket "$ADMIN" --parent-id spiffe://example.org/node/n1 \
    --spiffe-id "$ORCH" --selector "unix:uid:$(id -u)" --hint orchestrator \
    --scope 'calendar:*' --scope crm:read --scope payments:execute
agentd entry create --admin-socket "$ADMIN" --parent-id spiffe://example.org/node/n1 \
    --spiffe-id "$TOOL" --selector "unix:uid:$(id -u)" --hint tool
agentd entry create --admin-socket "$ADMIN" --parent-id spiffe://example.org/node/n2 \
    --spiffe-id "$SCHED" --selector "unix:uid:$(id -u)" --hint scheduler \
    --scope calendar:read --scope crm:read --scope payments:execute
# Each node agent picks its entries up at its next sync.
wait_for agentd api fetch x509 --socket-path "$DEMO/n1.sock"
wait_for agentd api fetch x509 --socket-path "$DEMO/n2.sock"

step "alice grants the orchestrator calendar:* and crm:read for 1h, one further hop allowed"
GRANT="$(agentd grant create --admin-socket "$ADMIN" --principal user:alice@example.com \
    --agent "$ORCH" --scope 'calendar:*' --scope crm:read --ttl 1h --max-depth 1)"
agentd grant show --admin-socket "$ADMIN" --id "$GRANT"
wait_for sh -c "\"$BIN\" api fetch x509 --socket-path \"$DEMO/n1.sock\" | grep -q 'grant:$GRANT'"

step "The orchestrator delegates calendar:read to the scheduler (10m)"
DTOKEN="$(agentd api delegate --socket-path "$DEMO/n1.sock" --to "$SCHED" --scope calendar:read --ttl 10m)"
echo "delegation token: ${DTOKEN:0:40}..."

step "The scheduler exchanges the token on its own node agent"
CHILD="$(agentd api exchange --socket-path "$DEMO/n2.sock" --token "$DTOKEN")"
echo "scheduler's grant: $CHILD"
wait_for sh -c "\"$BIN\" api fetch x509 --socket-path \"$DEMO/n2.sock\" | grep -q 'grant:$CHILD'"
agentd api fetch x509 --socket-path "$DEMO/n2.sock" --write "$DEMO/sched" >/dev/null
agentd svid inspect "$DEMO/sched/svid.1.pem" --bundle "$DEMO/bundle.pem"

step "The tool server, built on agentd's verifier"
"$EX/delegation-tool-server" --socket "unix://$DEMO/n1.sock" --hint tool \
    >"$DEMO/tool.out" 2>"$DEMO/tool.log" &
PIDS+=($!)
wait_for test -s "$DEMO/tool.out"
TOOL_ADDR="$(head -1 "$DEMO/tool.out")"

step "The scheduler calls three tools with its delegated identity"
"$EX/delegation-agent-call" --socket "unix://$DEMO/n2.sock" --addr "$TOOL_ADDR" \
    --server-id "$TOOL" --hint "grant:$CHILD" \
    --call calendar:read --call crm:read --call payments:execute
