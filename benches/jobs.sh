#!/usr/bin/env bash
# Jobs on one node (release build, SQLite, storage defaults: fsync on),
# the simulator as the backend:
#   1. memory: the gateway's RSS with 10,000 queued jobs (the account's 3
#      slots held by 3 long synchronous tasks, so the jobs stay queued);
#   2. for comparison, a fresh gateway's RSS with 1,000 queued synchronous
#      tasks (one connection each, 3 slots held the same way);
#   3. a fresh gateway, open loop at RATE submits/s for SECS s with
#      `tollgate loadgen --jobs` (0 ms backend, polled every 100 ms): submit
#      latency, time from submit to result, jobs finished per second, final
#      statuses, and the gateway's warnings and errors meanwhile.
# Each phase starts from an empty data directory and a new process, so no
# phase reuses memory an earlier one freed. Well under 2 minutes.
# Writes target/bench/jobs.json and .md.
# Usage: benches/jobs.sh [seconds] [submits per second] [queued jobs]
# BENCH_BIN=<a tollgate binary> runs that build as the gateway (an A/B of
# a change built in another worktree); the load generator is always this
# checkout's build.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
RATE=${2:-500}
JOBS=${3:-10000}
SYNC=1000
LOADGEN=target/release/tollgate
BIN=${BENCH_BIN:-$LOADGEN}
TOKEN=bench-admin-token-0123456789
OUT=target/bench
mkdir -p "$OUT"
cargo build --release --quiet --bin tollgate
source benches/lib.sh
bench_workdir
start_simulator --latency-ms 0 --jitter-ms 0
CONFIG='[server]
max_connections = 20000
[limits]
max_queue_per_account = 20000
max_queue_wait_ms = 120000
[jobs]
max_pending_per_account = 20000'
start_gateway "$SIM" "$CONFIG"

rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$GW_PID/status"; }
# concurrency FIELD ACCOUNT: in_flight, queued or jobs_queued.
concurrency() {
  curl -sf "${auth[@]}" "$ADMIN/v1/accounts/$2" |
    python3 -c "import json,sys; print(json.load(sys.stdin)['concurrency']['$1'])"
}
# wait_for FIELD ACCOUNT N: until the account's FIELD is at least N (30 s).
wait_for() {
  for _ in $(seq 300); do
    [ "$(concurrency "$1" "$2")" -ge "$3" ] && return
    sleep 0.1
  done
  echo "timeout: $2 $1 < $3" >&2
  exit 1
}
# hold ACCOUNT_KEY_FILE CONNECTIONS: synchronous tasks that take 100 s at
# the backend, in the background; sets $LG.
hold() {
  $LOADGEN loadgen --json --duration 90s --keys-file "$1" --connections "$2" \
    --header "X-Sim-Delay-Ms: 100000" --url "$GW/v1/style-transfer" >/dev/null 2>&1 &
  LG=$!
}

# restart: a fresh gateway on an empty data directory (so no phase gets
# memory an earlier one freed). SIGKILL: a graceful stop would wait
# server.shutdown_grace_ms for the held tasks, and nothing here needs it.
restart() {
  kill -KILL "$GW_PID"
  wait "$GW_PID" 2>/dev/null || true
  rm -rf "$work/data"
  start_gateway "$SIM" "$CONFIG"
}

echo "1/3 memory: $JOBS queued jobs" >&2
new_account mem >"$work/mem-key.txt"
IDLE_KIB=$(rss_kib)
hold "$work/mem-key.txt" 3
HOLD_MEM=$LG
wait_for in_flight mem 3
sleep 1
BEFORE_JOBS_KIB=$(rss_kib)
# JOBS submits are due (open loop, 1,000/s), no polling; at most 16 at
# once, so a slow moment does not open more connections (whose buffers
# would stay in the RSS and be counted per job): a submit due beyond that
# is dropped, and the figure is per job actually queued.
$LOADGEN loadgen --json --url "$GW/tollgate/jobs/v1/style-transfer" --keys-file "$work/mem-key.txt" \
  --rate 1000 --duration "$(( JOBS / 1000 ))s" --max-outstanding 16 >"$work/mem-submit.json" || true
sleep 1
QUEUED_JOBS=$(concurrency jobs_queued mem)
LIMITER_QUEUED=$(concurrency queued mem)
JOBS_KIB=$(rss_kib)
kill "$HOLD_MEM" 2>/dev/null || true
wait "$HOLD_MEM" 2>/dev/null || true

echo "2/3 memory: $SYNC queued synchronous tasks, a fresh gateway" >&2
restart
new_account sync >"$work/sync-key.txt"
SYNC_IDLE_KIB=$(rss_kib)
hold "$work/sync-key.txt" 3
HOLD_SYNC=$LG
wait_for in_flight sync 3
sleep 1
BEFORE_SYNC_KIB=$(rss_kib)
hold "$work/sync-key.txt" "$SYNC"
QUEUE_SYNC=$LG
wait_for queued sync "$SYNC"
sleep 1
QUEUED_SYNC=$(concurrency queued sync)
SYNC_KIB=$(rss_kib)
kill "$QUEUE_SYNC" "$HOLD_SYNC" 2>/dev/null || true
wait "$QUEUE_SYNC" "$HOLD_SYNC" 2>/dev/null || true

echo "3/3 open loop, $RATE submits/s for $SECS s, a fresh gateway" >&2
restart
new_account load >"$work/load-key.txt"
# Other work on the machine shows here (the figures below swing with it).
LOADAVG=$(cut -d' ' -f1-3 /proc/loadavg)
$LOADGEN loadgen --json --jobs --rate "$RATE" --duration "${SECS}s" --poll-ms 100 --drain-ms 10000 \
  --keys-file "$work/load-key.txt" --url "$GW/tollgate/jobs/v1/style-transfer" >"$work/open.json"
grep -E 'WARN|ERROR' "$work/gw.err" | grep -v 'tollgate::access' | cut -c1-300 >"$work/open-warnings.txt" || true

python3 - "$work" "$OUT" "$SECS" "$RATE" <<PY
import json, os, platform, sys
work, out, secs, rate = sys.argv[1:]
o = json.load(open(f"{work}/open.json"))
sub = json.load(open(f"{work}/mem-submit.json"))
mem = {"idle_rss_kib": $IDLE_KIB, "slots_held_rss_kib": $BEFORE_JOBS_KIB, "jobs_rss_kib": $JOBS_KIB,
       "queued_jobs": $QUEUED_JOBS, "limiter_queued_with_jobs": $LIMITER_QUEUED, "jobs_submit_statuses": sub["statuses"], "jobs_submit_dropped": sub["dropped"],
       "sync_idle_rss_kib": $SYNC_IDLE_KIB, "before_sync_rss_kib": $BEFORE_SYNC_KIB, "sync_rss_kib": $SYNC_KIB,
       "queued_sync": $QUEUED_SYNC}
warnings = open(f"{work}/open-warnings.txt").read().splitlines()
mem["bytes_per_job"] = (mem["jobs_rss_kib"] - mem["slots_held_rss_kib"]) * 1024 / max(mem["queued_jobs"], 1)
mem["bytes_per_sync_task"] = (mem["sync_rss_kib"] - mem["before_sync_rss_kib"]) * 1024 / max(mem["queued_sync"], 1)
res = {"machine": {"cores": os.cpu_count(), "kernel": platform.release()}, "open_loop": o, "memory": mem,
       "open_loop_gateway_warnings": warnings, "loadavg_before_open_loop": "$LOADAVG"}
json.dump(res, open(f"{out}/jobs.json", "w"), indent=2)
j, l = o["jobs"], o["latency_ms"]
md = [f"Machine: {os.cpu_count()} cores, Linux {platform.release()}; loadgen, simulator and gateway on the same cores.\n",
      f"### Open loop, {rate} submits/s for {secs} s (0 ms backend, 3 slots, polled every {j['poll_ms']} ms; load average before: $LOADAVG)\n",
      "| | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms |\n|---|---:|---:|---:|---:|---:|",
      f"| submit (from its due time) | {l['p50']:.2f} | {l['p90']:.2f} | {l['p99']:.2f} | {l['p999']:.2f} | {l['max']:.2f} |",
      f"| submit to result (poll saw it final) | {j['to_result_ms']['p50']:.1f} | {j['to_result_ms']['p90']:.1f} | {j['to_result_ms']['p99']:.1f} | {j['to_result_ms']['p999']:.1f} | {j['to_result_ms']['max']:.1f} |",
      f"| created_at to finished_at (gateway) | {j['server_ms']['p50']:.1f} | {j['server_ms']['p90']:.1f} | {j['server_ms']['p99']:.1f} | {j['server_ms']['p999']:.1f} | {j['server_ms']['max']:.1f} |",
      f"\nsubmits {o['requests']} (statuses {o['statuses']}, dropped {o['dropped']}, conn errors {o['connection_errors']}, unfinished {o['unfinished']}); "
      f"jobs accepted {j['accepted']}, finished {j['finished']} ({j['finished_per_s']:.0f} jobs/s), final {j['by_status']}, unfinished {j['unfinished_by_status']}, lost {j['lost']}; "
      f"{j['polls']} polls, {j['poll_errors']} poll errors; gateway warnings and errors: {len(warnings)}\n",
      *[f"    {w}" for w in warnings[:10]],
      "",
      "### Memory\n",
      f"RSS idle {mem['idle_rss_kib']} KiB; 3 slots held {mem['slots_held_rss_kib']} KiB; with {mem['queued_jobs']} queued jobs {mem['jobs_rss_kib']} KiB "
      f"(limiter queue {mem['limiter_queued_with_jobs']}; submits {mem['jobs_submit_statuses']}, {mem['jobs_submit_dropped']} dropped): **{mem['bytes_per_job']:.0f} bytes per queued job**\n",
      f"a fresh gateway: RSS idle {mem['sync_idle_rss_kib']} KiB, 3 slots held {mem['before_sync_rss_kib']} KiB; with {mem['queued_sync']} queued synchronous tasks {mem['sync_rss_kib']} KiB: "
      f"**{mem['bytes_per_sync_task']:.0f} bytes per queued synchronous task**, connection included\n"]
open(f"{out}/jobs.md", "w").write("\n".join(md) + "\n")
print("\n".join(md))
PY
