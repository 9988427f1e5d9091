#!/usr/bin/env bash
# SQLite WAL size under the heaviest load the gateway takes (issue 11, bug 2):
#   1. closed loop, 64 connections, N accounts, 0 ms backend, for SECS
#      seconds: every success is a durable usage event; the WAL's size is
#      sampled every 20 ms and its peak reported, with how long each RESTART
#      checkpoint held the writer off (from the checkpointer's debug log);
#   2. after the load: how long until the WAL is empty again;
#   3. ACCOUNTS_CREATE account creations through the admin API (8 at a
#      time), again with the WAL's peak.
# Target: the WAL below 64 MiB at any time, empty once the load stops.
# Usage: benches/wal.sh [seconds] [accounts]   (ACCOUNTS_CREATE=10000 default)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-30}
ACCOUNTS=${2:-100}
CREATE=${ACCOUNTS_CREATE:-10000}
BIN=${CARGO_TARGET_DIR:-target}/release/tollgate
TOKEN=bench-admin-token-0123456789
[ -n "${NO_BUILD:-}" ] || cargo build --release --quiet --bin tollgate
source benches/lib.sh
bench_workdir
start_simulator --latency-ms 0 --jitter-ms 0
start_gateway "$SIM" '[log]
level = "warn,tollgate::store::sqlite::checkpoint=debug"'
WAL="$work/data/tollgate.db-wal"
DB="$work/data/tollgate.db"
for i in $(seq 1 "$ACCOUNTS"); do new_account "bench-$i"; done >"$work/keys.txt"

size() { stat -c %s "$1" 2>/dev/null || echo 0; }
# Samples the WAL's size every 20 ms into $1 until killed.
sample() { while :; do size "$WAL"; sleep 0.02; done >"$1"; }
peak() { sort -n "$1" | tail -1; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }

echo "1/3 sustained load: ${SECS}s, 64 connections, $ACCOUNTS accounts, 0 ms backend" >&2
sample "$work/load.samples" & SAMPLER=$!
$BIN loadgen --json --duration "${SECS}s" --keys-file "$work/keys.txt" --connections 64 \
  --url "$GW/v1/style-transfer" >"$work/load.json"
kill $SAMPLER; wait $SAMPLER 2>/dev/null || true
RPS=$(python3 -c "import json; r=json.load(open('$work/load.json')); print(round(r['throughput_rps']))")
OK=$(python3 -c "import json; r=json.load(open('$work/load.json')); print(r['ok_2xx'])")
LAT=$(python3 -c "import json; l=json.load(open('$work/load.json'))['latency_ms']; print('p50 %.1f / p99 %.1f / p99.9 %.1f / max %.1f ms' % (l['p50'], l['p99'], l['p999'], l['max']))")
LOAD_PEAK=$(peak "$work/load.samples")
RESTARTS=$(grep -c 'WAL restart checkpoint' "$work/gw.err" || true)
HOLD=$( { grep 'WAL restart checkpoint' "$work/gw.err" || true; } | { grep -o 'took_ms=[0-9]*' || true; } | cut -d= -f2 | sort -n |
  awk '{a[NR]=$1} END { if (NR) printf "p50 %d ms, max %d ms", a[int((NR+1)/2)], a[NR]; else print "none" }')

echo "2/3 after the load: waiting for the WAL to empty" >&2
AT_STOP=$(size "$WAL")
t0=$(date +%s.%N)
for _ in $(seq 600); do [ "$(size "$WAL")" -eq 0 ] && break; sleep 0.05; done
EMPTY_AFTER=$(python3 -c "print(round($(date +%s.%N) - $t0, 2))")
LEFT=$(size "$WAL")

echo "3/3 $CREATE account creations, 8 at a time" >&2
sample "$work/create.samples" & SAMPLER=$!
c0=$(date +%s.%N)
seq 1 "$CREATE" | xargs -P 8 -I{} curl -sf -o /dev/null "${auth[@]}" -X POST "$ADMIN/v1/accounts" -d '{"id":"c-{}"}'
CREATE_SECS=$(python3 -c "print(round($(date +%s.%N) - $c0, 1))")
kill $SAMPLER; wait $SAMPLER 2>/dev/null || true
CREATE_PEAK=$(peak "$work/create.samples")
for _ in $(seq 600); do [ "$(size "$WAL")" -eq 0 ] && break; sleep 0.05; done

cat <<MD
| phase | figure |
|---|---|
| sustained load | $RPS req/s, $OK successes (each a durable event) in ${SECS}s |
| WAL peak under load | **$(mib "$LOAD_PEAK")** (sampled every 20 ms; target < 64 MiB) |
| client latency under load | $LAT |
| restarting checkpoints (WAL past 16 MiB) | $RESTARTS; each call $HOLD (includes waiting for the writer's batch in progress) |
| WAL at the end of the load | $(mib "$AT_STOP"); empty **${EMPTY_AFTER} s** later (now $(mib "$LEFT")) |
| $CREATE account creations | ${CREATE_SECS} s; WAL peak **$(mib "$CREATE_PEAK")**, then $(mib "$(size "$WAL")") |
| database file | $(mib "$(size "$DB")") |
MD
