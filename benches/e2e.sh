#!/usr/bin/env bash
# End-to-end benches on loopback, all in one run on this machine:
#   1. maximum throughput, closed loop, 64 connections, 0 ms backend:
#      the simulator straight, tollgate, nginx and HAProxy (plain proxies);
#   2. latency at fixed open-loop rates (10-90 % of tollgate's maximum),
#      straight, tollgate, nginx and HAProxy: p50 / p99 / p99.9;
#   3. saturation with a 50 ms backend: throughput = accounts x limit / 50 ms,
#      and queue wait as the queue predicts;
#   4. memory: the gateway's RSS idle and with 10,000 tasks queued (run
#      first, before any load).
# Writes target/bench/e2e.json and .md and docs/latency-vs-load.svg.
# Usage: benches/e2e.sh [seconds per run] [accounts]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-5}
ACCOUNTS=${2:-100}
BIN=target/release/tollgate
TOKEN=bench-admin-token-0123456789
OUT=target/bench
mkdir -p "$OUT"
cargo build --release --quiet --bin tollgate --example plot_latency
source benches/lib.sh
bench_workdir
start_simulator --latency-ms 0 --jitter-ms 0
start_gateway "$SIM" '[server]
max_connections = 20000
[limits]
max_queue_per_account = 20000
max_queue_wait_ms = 120000'
for i in $(seq 1 "$ACCOUNTS"); do new_account "bench-$i"; done >"$work/keys.txt"

source benches/proxies.sh
start_proxies

run() { $BIN loadgen --json --duration "${SECS}s" --keys-file "$work/keys.txt" "$@"; }
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$GW_PID/status"; }

echo "1/4 memory (before any load, so freed memory is not reused)" >&2
IDLE_KIB=$(rss_kib)
new_account mem >"$work/mem-key.txt"
$BIN loadgen --json --duration 20s --keys-file "$work/mem-key.txt" --connections 10003 \
  --header "X-Sim-Delay-Ms: 60000" --url "$GW/v1/style-transfer" >/dev/null 2>&1 &
LG=$!
QUEUED=0
for _ in $(seq 300); do
  QUEUED=$(curl -sf "${auth[@]}" "$ADMIN/v1/accounts/mem" | python3 -c "import json,sys; print(json.load(sys.stdin)['concurrency']['queued'])")
  [ "$QUEUED" -ge 10000 ] && break
  sleep 0.1
done
sleep 1
QUEUED_KIB=$(rss_kib)
kill "$LG" 2>/dev/null || true
wait "$LG" 2>/dev/null || true

declare -A URL=([simulator]="$SIM" [tollgate]="$GW" [nginx]="$NGINX" [haproxy]="$HAPROXY")
echo "2/4 throughput" >&2
for t in simulator tollgate nginx haproxy; do
  run --url "${URL[$t]}/v1/style-transfer" --connections 64 >"$work/tp-$t.json"
done
MAX=$(python3 -c "import json; print(int(json.load(open('$work/tp-tollgate.json'))['throughput_rps']))")

echo "3/4 latency at fixed rates" >&2
for pct in 10 25 50 75 90; do
  rate=$(( MAX * pct / 100 ))
  for t in simulator tollgate nginx haproxy; do
    # A run where nothing succeeded exits 1 but still has its summary.
    run --url "${URL[$t]}/v1/style-transfer" --rate "$rate" >"$work/lat-$t-$pct.json" || true
  done
done

echo "4/4 saturation, 50 ms backend" >&2
for i in 1 2 3 4; do new_account "sat-$i"; done >"$work/sat-keys.txt"
$BIN loadgen --json --duration "$(( SECS * 2 ))s" --keys-file "$work/sat-keys.txt" --connections 48 \
  --header "X-Sim-Delay-Ms: 50" --url "$GW/v1/style-transfer" >"$work/sat.json"



python3 - "$work" "$SECS" "$ACCOUNTS" "$IDLE_KIB" "$QUEUED_KIB" "$QUEUED" "$OUT" <<'PY'
import json, sys, platform, os
work, secs, accounts, idle, queued_kib, queued, out = sys.argv[1:]
load = lambda n: json.load(open(f"{work}/{n}.json"))
tp = {t: load(f"tp-{t}") for t in ["simulator", "tollgate", "nginx", "haproxy"]}
lat = []
for pct in [10, 25, 50, 75, 90]:
    for t in ["simulator", "tollgate", "nginx", "haproxy"]:
        r = load(f"lat-{t}-{pct}")
        rate = float(r["mode"].split()[2])
        lat.append({"target": t, "pct_of_max": pct, "offered_rps": rate, "p50_ms": r["latency_ms"]["p50"],
                    "p99_ms": r["latency_ms"]["p99"], "p999_ms": r["latency_ms"]["p999"], "ok": r["ok_2xx"], "requests": r["requests"]})
sat = load("sat")
res = {"machine": {"cores": os.cpu_count(), "kernel": platform.release()}, "seconds": int(secs), "accounts": int(accounts),
       "throughput": {t: {"rps": r["throughput_rps"], "p50_ms": r["latency_ms"]["p50"], "p99_ms": r["latency_ms"]["p99"], "statuses": r["statuses"]} for t, r in tp.items()},
       "latency": lat, "saturation": sat,
       "memory": {"idle_rss_kib": int(idle), "queued_rss_kib": int(queued_kib), "queued_tasks": int(queued)}}
json.dump(res, open(f"{out}/e2e.json", "w"), indent=2)
md = []
md.append(f"Machine: {os.cpu_count()} cores, Linux {platform.release()}; {accounts} accounts; {secs} s per run; every process (load generator, proxy, simulator) on the same cores.\n")
md.append("### 1. Maximum throughput (closed loop, 64 connections, 0 ms backend)\n")
md.append("| target | req/s | p50 ms | p99 ms | statuses |\n|---|---:|---:|---:|---|")
for t, r in res["throughput"].items():
    md.append(f"| {t} | {r['rps']:.0f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['statuses']} |")
g, n = res["throughput"]["tollgate"]["rps"], res["throughput"]["nginx"]["rps"]
md.append(f"\ntollgate / nginx = **{g / n:.2f}**; tollgate / simulator straight = {g / res['throughput']['simulator']['rps']:.2f}\n")
md.append("### 2. Latency at fixed rates (open loop, from the due time)\n")
md.append("| % of tollgate max | req/s | straight p50 / p99 / p99.9 ms | tollgate p50 / p99 / p99.9 ms | nginx p50 / p99 / p99.9 ms | HAProxy p50 / p99 / p99.9 ms | tollgate added p50 / p99 ms |\n|---:|---:|---|---|---|---|---|")
for pct in [10, 25, 50, 75, 90]:
    row = {r["target"]: r for r in lat if r["pct_of_max"] == pct}
    f = lambda r: f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f} / {r['p999_ms']:.2f}"
    s, t, x, h = row["simulator"], row["tollgate"], row["nginx"], row["haproxy"]
    md.append(f"| {pct} | {t['offered_rps']:.0f} | {f(s)} | {f(t)} | {f(x)} | {f(h)} | {t['p50_ms'] - s['p50_ms']:.2f} / {t['p99_ms'] - s['p99_ms']:.2f} |")
exp_rps = 4 * 3 / 0.05
md.append("\n### 3. Saturation (4 accounts x limit 3, 50 ms backend, 48 connections)\n")
md.append(f"throughput {sat['throughput_rps']:.0f} req/s (expected 4 x 3 / 0.05 s = {exp_rps:.0f}); latency p50 {sat['latency_ms']['p50']:.0f} ms, p99 {sat['latency_ms']['p99']:.0f} ms "
          f"(expected about 12 tasks per account / 3 slots x 50 ms = 200 ms: 150 ms queued + 50 ms at the backend); statuses {sat['statuses']}\n")
m = res["memory"]
per = (m["queued_rss_kib"] - m["idle_rss_kib"]) * 1024 / max(m["queued_tasks"], 1)
md.append("### 4. Memory\n")
md.append(f"gateway RSS idle {m['idle_rss_kib']} KiB; with {m['queued_tasks']} tasks queued (one connection each, bodies unread) {m['queued_rss_kib']} KiB: **{per:.0f} bytes per queued task**, connection included\n")
open(f"{out}/e2e.md", "w").write("\n".join(md) + "\n")
print("\n".join(md))
PY
target/release/examples/plot_latency "$OUT/e2e.json" docs/latency-vs-load.svg >&2
