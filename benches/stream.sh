#!/usr/bin/env bash
# The NATS JetStream publisher's own rate on one node (release build,
# SQLite, fsync on, the simulator at 0 ms as the backend, a private
# `nats-server -js` on a free port):
#   1. a backlog: SECS s of closed-loop load (16 accounts, 3 slots each,
#      48 connections) while NATS is not running, so every event waits in
#      the store;
#   2. NATS starts with no load: how fast the publisher drains the backlog
#      (events published per second, from tollgate_stream_published_total
#      sampled every 100 ms until the lag is 0);
#   3. SECS s of the same load with NATS up: tasks/s and the lag at the
#      end (the publisher keeps up if it stays near 0).
# Everything shares the machine's cores: the rates are of this machine.
# Writes target/bench/stream.json and .md. Usage: benches/stream.sh [seconds]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
BIN=target/release/tollgate
TOKEN=bench-admin-token-0123456789
OUT=target/bench
mkdir -p "$OUT"
cargo build --release --quiet --bin tollgate
source benches/lib.sh
bench_workdir

NATS_PORT=$(free_port)
NATS_BIN=$(command -v nats-server || echo /usr/sbin/nats-server)
start_simulator --latency-ms 0 --jitter-ms 0
start_gateway "$SIM" "[events]
stream = \"nats\"
nats_url = \"nats://127.0.0.1:$NATS_PORT\"
subject = \"bench\"
stream_name = \"BENCH\""
for i in $(seq 16); do new_account "acct$i"; done >"$work/keys.txt"

scrape() { curl -s "$ADMIN/metrics" | awk -v m="$1" '$1==m {print $2}'; }
load() {
  $BIN loadgen --json --duration "${SECS}s" --connections 48 --keys-file "$work/keys.txt" \
    --body-size 200 --url "$GW/v1/style-transfer" >"$1"
}

echo "1/3 backlog: $SECS s of load, NATS not running" >&2
load "$work/backlog.json"
BACKLOG=$(python3 -c "import json; print(json.load(open('$work/backlog.json'))['statuses'].get('200', 0))")

echo "2/3 NATS starts: draining $BACKLOG events" >&2
"$NATS_BIN" -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$work/nats" >/dev/null 2>&1 &
pub0=$(scrape tollgate_stream_published_total)
t0=$(date +%s.%N)
: >"$work/drain.txt"
for _ in $(seq 1200); do
  sleep 0.1
  p=$(scrape tollgate_stream_published_total)
  echo "$(date +%s.%N) $p" >>"$work/drain.txt"
  [ "$(scrape tollgate_stream_lag_events)" = "0" ] && [ "${p%.*}" -ge "$(( ${pub0%.*} + BACKLOG ))" ] && break
done

echo "3/3 $SECS s of load with NATS up" >&2
load "$work/live.json"
LAG_END=$(scrape tollgate_stream_lag_events)
sleep 1
LAG_1S=$(scrape tollgate_stream_lag_events)
ERRORS=$(scrape tollgate_stream_errors_total)

python3 - "$work" "$OUT" "$SECS" "$BACKLOG" "$pub0" "$t0" "$LAG_END" "$LAG_1S" "$ERRORS" <<'PY'
import json, os, platform, sys
work, out, secs, backlog, pub0, t0, lag_end, lag_1s, errors = sys.argv[1:]
samples = [tuple(map(float, l.split())) for l in open(f"{work}/drain.txt") if l.strip()]
# From the first sample that saw a publish to the one that saw the last.
moving = [s for s in samples if s[1] > float(pub0)]
first_t = float(t0)
last_t, last_p = moving[-1] if moving else (first_t, float(pub0))
drained = last_p - float(pub0)
rate = drained / (last_t - first_t) if last_t > first_t else 0
backlog_run = json.load(open(f"{work}/backlog.json"))
live = json.load(open(f"{work}/live.json"))
res = {"machine": {"cores": os.cpu_count(), "kernel": platform.release()}, "seconds": int(secs),
       "backlog_events": int(backlog), "drained": drained, "drain_seconds": last_t - first_t,
       "published_per_s": rate, "backlog_load_rps": backlog_run["throughput_rps"],
       "live_load_rps": live["throughput_rps"], "lag_at_end_of_load": float(lag_end),
       "lag_1s_later": float(lag_1s), "stream_errors": float(errors)}
json.dump(res, open(f"{out}/stream.json", "w"), indent=2)
md = [f"Machine: {os.cpu_count()} cores, Linux {platform.release()}; load generator, simulator, NATS and gateway on the same cores.\n",
      "| | figure |\n|---|---:|",
      f"| load while NATS was away (events left in the store) | {backlog_run['throughput_rps']:,.0f} tasks/s, {int(backlog):,} events |",
      f"| **backlog drained once NATS started (no load)** | **{rate:,.0f} events/s** ({drained:,.0f} in {last_t - first_t:.2f} s, NATS start included) |",
      f"| load with NATS up | {live['throughput_rps']:,.0f} tasks/s |",
      f"| lag at the end of that load / 1 s later | {float(lag_end):,.0f} / {float(lag_1s):,.0f} events |",
      f"| publisher errors counted (NATS away in phase 1) | {float(errors):,.0f} |"]
open(f"{out}/stream.md", "w").write("\n".join(md) + "\n")
print("\n".join(md))
PY
