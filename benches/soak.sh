#!/usr/bin/env bash
# Soak: mixed load for a long time (10 minutes by default), then the
# invariants checked on what is left. Run by hand, never in CI.
#
# Load, all at once for the whole run, against one gateway (release build)
# in front of the simulator (20 ± 10 ms, 5 % backend 500s):
#   - 48 connections over 20 postpaid accounts (limit 3 each: queueing);
#   - 100 req/s over 5 accounts on their 50 free units (then LowBalance);
#   - clients that give up: tasks of 2 s cancelled after 50 ms, mostly
#     while queued;
#   - backend faults on request (X-Sim-Status: 500, 502);
#   - key churn: every 5 s a key is issued, used by a few queued tasks and
#     revoked while they wait.
# Then, once idle: no slot held and nothing queued for any account; usage
# events (admin cursor) = successes counted in tollgate_requests_total;
# the outcome counts sum to the requests the clients sent; the WAL back to
# its bound and the RSS near its start.
#
# Usage: benches/soak.sh [seconds]   (writes target/bench/soak.md)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-600}
BIN=${BENCH_BIN:-target/release/tollgate}
TOKEN=bench-admin-token-0123456789
OUT=target/bench
mkdir -p "$OUT"
[ -n "${BENCH_BIN:-}" ] || cargo build --release --quiet --bin tollgate
source benches/lib.sh
bench_workdir "$PWD/target"
start_simulator --latency-ms 20 --jitter-ms 10 --failure-rate 0.05
start_gateway "$SIM" '[backend]
timeout_ms = 10000
[limits]
max_queue_per_account = 100
max_queue_wait_ms = 5000'
for i in $(seq 1 20); do new_account "paid-$i"; done >"$work/paid.txt"
for i in $(seq 1 5); do new_account "free-$i" free; done >"$work/free.txt"
rss() { awk '/VmRSS/ {print $2}' "/proc/$GW_PID/status"; }
RSS0=$(rss)
echo "soak: $SECS s against $GW (RSS at start $RSS0 KiB)" >&2

$BIN loadgen --json --duration "${SECS}s" --keys-file "$work/paid.txt" --connections 48 --url "$GW/v1/style-transfer" >"$work/lg-paid.json" &
LG1=$!
$BIN loadgen --json --duration "${SECS}s" --keys-file "$work/free.txt" --rate 100 --url "$GW/v1/style-transfer" >"$work/lg-free.json" &
LG2=$!
end=$(( $(date +%s) + SECS ))
# Clients that give up, and backend faults: one curl each, counted.
( n=0; while [ "$(date +%s)" -lt "$end" ]; do
    k=$(sed -n "$(( RANDOM % 20 + 1 ))p" "$work/paid.txt")
    curl -s -o /dev/null --max-time 0.05 -H "Authorization: Bearer $k" -H "X-Sim-Delay-Ms: 2000" -X POST "$GW/v1/style-transfer" -d '{}' || true
    curl -s -o /dev/null -H "Authorization: Bearer $k" -H "X-Sim-Status: $(( RANDOM % 2 ? 500 : 502 ))" -X POST "$GW/v1/style-transfer" -d '{}' || true
    n=$(( n + 2 ))
  done; echo "$n" >"$work/churn.count" ) &
CH=$!
# Key churn: a key issued, a few tasks queued with it, the key revoked.
( n=0; while [ "$(date +%s)" -lt "$end" ]; do
    i=$(( RANDOM % 20 + 1 ))
    r=$(curl -sf "${auth[@]}" -X POST "$ADMIN/v1/accounts/paid-$i/keys" -d '{}')
    k=$(echo "$r" | python3 -c 'import json,sys; print(json.load(sys.stdin)["api_key"])')
    id=$(echo "$r" | python3 -c 'import json,sys; print(json.load(sys.stdin)["key_id"])')
    for _ in 1 2 3 4; do curl -s -o /dev/null -H "Authorization: Bearer $k" -H "X-Sim-Delay-Ms: 300" -X POST "$GW/v1/style-transfer" -d '{}' & done
    sleep 0.1
    curl -sf "${auth[@]}" -X DELETE "$ADMIN/v1/keys/$id" >/dev/null || true
    wait
    n=$(( n + 4 ))
    sleep 5
  done; echo "$n" >"$work/revoke.count" ) &
RV=$!
PEAK_WAL=0
PEAK_RSS=0
while kill -0 $LG1 2>/dev/null; do
  w=$(stat -c %s "$work/data/tollgate.db-wal" 2>/dev/null || echo 0)
  r=$(rss)
  [ "$w" -gt "$PEAK_WAL" ] && PEAK_WAL=$w
  [ "$r" -gt "$PEAK_RSS" ] && PEAK_RSS=$r
  sleep 1
done
wait $LG1 $LG2 $CH $RV || true
sleep 3 # queue waits end, the WAL's idle checkpoint runs

python3 - "$work" "$ADMIN" "$TOKEN" "$SECS" "$RSS0" "$(rss)" "$PEAK_RSS" "$PEAK_WAL" \
  "$(stat -c %s "$work/data/tollgate.db-wal" 2>/dev/null || echo 0)" "$OUT" <<'PY'
import json, sys, urllib.request
work, admin, token, secs, rss0, rss1, peak_rss, peak_wal, wal1, out = sys.argv[1:]
def get(path):
    req = urllib.request.Request(admin + path, headers={"Authorization": "Bearer " + token})
    return urllib.request.urlopen(req).read().decode()
busy = []
for kind, n in [("paid", 20), ("free", 5)]:
    for i in range(1, n + 1):
        a = json.loads(get(f"/v1/accounts/{kind}-{i}"))
        c = a["concurrency"]
        if c["in_flight"] or c["queued"]:
            busy.append((a["id"], c))
events, after = 0, ""
while True:
    page = json.loads(get(f"/v1/usage-events?after={after}&limit=1000"))
    if not page["events"]:
        break
    events += len(page["events"])
    after = page["next"]
outcomes = {}
for line in get("/metrics").splitlines():
    if line.startswith("tollgate_requests_total{"):
        label = line.split('outcome="')[1].split('"')[0]
        outcomes[label] = outcomes.get(label, 0) + int(float(line.split()[-1]))
lg = [json.load(open(f"{work}/lg-{k}.json")) for k in ("paid", "free")]
sent = sum(l["requests"] for l in lg) + int(open(f"{work}/churn.count").read()) + int(open(f"{work}/revoke.count").read())
counted = sum(outcomes.values())
checks = {
    "no slot held, nothing queued": not busy,
    "usage events = successes": events == outcomes.get("success", 0),
    # loadgen counts the requests it saw answered; up to its 56 connections'
    # last requests may be cut at the deadline and still counted here.
    "outcome counts = requests sent (+ at most 56 cut at the deadline)": 0 <= counted - sent <= 56,
    "WAL back under its 16 MiB bound": int(wal1) <= 16 << 20,
    "RSS within 64 MiB of its start": int(rss1) - int(rss0) <= 64 << 10,
}
md = [f"Soak, {secs} s: {sent} requests sent, outcomes {outcomes}, {events} usage events.\n",
      f"RSS {rss0} KiB at start, peak {peak_rss} KiB, {rss1} KiB after; WAL peak {int(peak_wal) / 2**20:.1f} MiB, {int(wal1) / 2**20:.1f} MiB after.\n",
      "| invariant | held |", "|---|---|"]
md += [f"| {k} | {'yes' if v else '**NO**'} |" for k, v in checks.items()]
if busy:
    md.append(f"\nbusy accounts: {busy}")
open(f"{out}/soak.md", "w").write("\n".join(md) + "\n")
print("\n".join(md))
sys.exit(0 if all(checks.values()) else 1)
PY
