#!/usr/bin/env bash
# End-to-end throughput and added latency on loopback:
#   1. maximum throughput straight to the simulator vs. through tollgate
#      (0 ms backend, closed loop, 64 connections, ACCOUNTS accounts);
#   2. latency at a fixed rate (open loop) straight vs. through tollgate.
# Usage: benches/e2e.sh [seconds per run] [accounts] [fixed rate]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
ACCOUNTS=${2:-100}
RATE=${3:-}
BIN=target/release/tollgate
TOKEN=bench-admin-token-0123456789
cargo build --release --quiet
work=$(mktemp -d)
cleanup() { kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$work"; }
trap cleanup EXIT

$BIN simulate --listen 127.0.0.1:0 --latency-ms 0 --jitter-ms 0 >"$work/sim.out" 2>/dev/null &
until grep -q http "$work/sim.out" 2>/dev/null; do sleep 0.05; done
SIM=$(grep -o 'http://[0-9.:]*' "$work/sim.out")

cat >"$work/gw.toml" <<TOML
[server]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
token = "$TOKEN"
[backend]
url = "$SIM"
[limits]
max_queue_per_account = 10000
[storage]
data_dir = "$work/data"
[log]
level = "warn"
TOML
$BIN serve --config "$work/gw.toml" >"$work/gw.out" 2>"$work/gw.err" &
until [ "$(grep -c http "$work/gw.out" 2>/dev/null)" = 2 ]; do sleep 0.05; done
GW=$(grep 'data plane' "$work/gw.out" | grep -o 'http://[0-9.:]*')
ADMIN=$(grep 'admin' "$work/gw.out" | grep -o 'http://[0-9.:]*')

for i in $(seq 1 "$ACCOUNTS"); do
  curl -sf -H "Authorization: Bearer $TOKEN" -X POST "$ADMIN/v1/accounts" -d "{\"id\":\"bench-$i\"}" >/dev/null
  curl -sf -H "Authorization: Bearer $TOKEN" -X PUT "$ADMIN/v1/accounts/bench-$i/postpaid" -d "{\"enabled\":true}" >/dev/null
  { curl -sf -H "Authorization: Bearer $TOKEN" -X POST "$ADMIN/v1/accounts/bench-$i/keys" -d '{}' \
    | sed 's/.*"api_key":"\([^"]*\)".*/\1/'; echo; } >>"$work/keys.txt"
done

echo "work dir: $work" >&2
source "$(dirname "$0")/proxies.sh"
start_proxies
run() { $BIN loadgen --json --duration "${SECS}s" --keys-file "$work/keys.txt" "$@"; }
field() { python3 -c "import json,sys; r=json.load(sys.stdin); print($1)"; }

echo "## machine: $(nproc) cores, $(uname -r); $ACCOUNTS accounts, ${SECS}s per run"
direct=$(run --url "$SIM/v1/style-transfer" --connections 64)
gateway=$(run --url "$GW/v1/style-transfer" --connections 64)
nginx=$(run --url "$NGINX/v1/style-transfer" --connections 64)
haproxy=$(run --url "$HAPROXY/v1/style-transfer" --connections 64)
d_rps=$(echo "$direct" | field 'round(r["throughput_rps"])')
g_rps=$(echo "$gateway" | field 'round(r["throughput_rps"])')
n_rps=$(echo "$nginx" | field 'round(r["throughput_rps"])')
h_rps=$(echo "$haproxy" | field 'round(r["throughput_rps"])')
echo "max throughput, 64 connections: simulator direct $d_rps req/s; through tollgate $g_rps; nginx $n_rps; haproxy $h_rps"
echo "tollgate / nginx = $(python3 -c "print(round($g_rps/$n_rps, 2))")"
echo "$gateway" | field "'  through tollgate: statuses %s, errors %s' % (r['statuses'], r['error_codes'])"

RATE=${RATE:-$(( g_rps / 2 ))}
echo "fixed rate $RATE req/s (open loop, latency from the due time):"
for target in "$SIM" "$GW"; do
  name=$([ "$target" = "$SIM" ] && echo "simulator direct" || echo "through tollgate")
  run --url "$target/v1/style-transfer" --rate "$RATE" \
    | field "'  $name: p50 %.3f ms  p99 %.3f ms  p99.9 %.3f ms  (%d requests, %d 2xx)' % (r['latency_ms']['p50'], r['latency_ms']['p99'], r['latency_ms']['p999'], r['requests'], r['ok_2xx'])"
done
echo "usage events stored: $(curl -sf "$ADMIN/metrics" | grep '^tollgate_usage_events_total' | awk '{print $2}')"
