#!/usr/bin/env bash
# `make demo`: a server and a node agent in a temp dir; the current user's processes are
# registered as an agent; we fetch its SVID, watch it rotate, and stop everything cleanly.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${AGENTD_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/debug/agentd}"
DEMO="$(mktemp -d /tmp/agentd-demo.XXXXXX)"
ADMIN="$DEMO/admin.sock"
SOCK="$DEMO/api.sock"
PIDS=()

cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$DEMO"
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
agentd() { "$BIN" "$@"; }

step "Starting the server (trust domain example.org, data in $DEMO/server)"
agentd server run --data-dir "$DEMO/server" --bind-address 127.0.0.1:0 \
    --admin-socket "$ADMIN" >"$DEMO/server.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do
    agentd healthcheck --admin-socket "$ADMIN" >/dev/null 2>&1 && break
    sleep 0.1
done
ADDR="$(agentd healthcheck --admin-socket "$ADMIN" --output json | sed -E 's/.*"node_api_address":"([^"]+)".*/\1/')"
echo "node API on $ADDR"

step "Starting a node agent, attested with a one-time join token"
agentd bundle show --admin-socket "$ADMIN" >"$DEMO/bundle.pem"
TOKEN="$(agentd token generate --spiffe-id spiffe://example.org/node/demo --admin-socket "$ADMIN")"
agentd node run --server-address "$ADDR" --join-token "$TOKEN" --trust-bundle "$DEMO/bundle.pem" \
    --data-dir "$DEMO/node" --socket-path "$SOCK" --sync-interval 1s >"$DEMO/node.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do
    agentd healthcheck --socket-path "$SOCK" >/dev/null 2>&1 && break
    sleep 0.1
done
agentd node list --admin-socket "$ADMIN"

step "Registering the current user (uid $(id -u)) as agent spiffe://example.org/agent/demo (X.509-SVID TTL 10s)"
agentd entry create --admin-socket "$ADMIN" \
    --parent-id spiffe://example.org/node/demo \
    --spiffe-id spiffe://example.org/agent/demo \
    --selector "unix:uid:$(id -u)" \
    --scope calendar:read --owner "$(id -un)@example.com" \
    --x509-svid-ttl 10s

step "Fetching the SVID over the SPIFFE Workload API"
for _ in $(seq 100); do
    agentd api fetch x509 --socket-path "$SOCK" >/dev/null 2>&1 && break
    sleep 0.1
done
agentd api fetch x509 --socket-path "$SOCK" --write "$DEMO/svid"
openssl verify -CAfile "$DEMO/svid/bundle.0.pem" "$DEMO/svid/svid.0.pem" 2>/dev/null || true

step "A JWT-SVID for audience tools.example.org, validated by the node agent"
JWT="$(agentd api fetch jwt --audience tools.example.org --socket-path "$SOCK" --output json \
    | sed -E 's/.*"svid":"([^"]+)".*/\1/')"
echo "${JWT:0:60}..."
agentd api validate jwt --audience tools.example.org --svid "$JWT" --socket-path "$SOCK"

step "Waiting for rotation: the node agent renews the SVID at about half its 10s lifetime"
FIRST="$(agentd api fetch x509 --socket-path "$SOCK" --output json | sed -E 's/.*"serial":"([^"]+)".*/\1/')"
echo "current serial: $FIRST"
ROTATED=""
for _ in $(seq 120); do
    NOW="$(agentd api fetch x509 --socket-path "$SOCK" --output json | sed -E 's/.*"serial":"([^"]+)".*/\1/')"
    if [ "$NOW" != "$FIRST" ]; then ROTATED="$NOW"; break; fi
    sleep 0.1
done
if [ -n "$ROTATED" ]; then
    echo "rotated:        $ROTATED"
else
    echo "no rotation seen within 12s; see $DEMO/node.log" >&2
    exit 1
fi

step "Revoking the entry: pushed to the node agent, the workload loses its identity at once"
ID="$(agentd entry show --admin-socket "$ADMIN" --spiffe-id spiffe://example.org/agent/demo --output json \
    | sed -E 's/.*"id":"([0-9a-f]{32})".*/\1/')"
agentd revoke entry --admin-socket "$ADMIN" --id "$ID" --reason "demo"
agentd api fetch x509 --socket-path "$SOCK" || true
agentd revoke list --admin-socket "$ADMIN"

step "Deleting the entry"
agentd entry delete --admin-socket "$ADMIN" --id "$ID"

step "Stopping the node agent and the server"
cleanup
trap - EXIT
echo "done"
