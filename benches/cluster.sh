#!/usr/bin/env bash
# Cluster mode's cost on loopback (SPEC §8.10), all in one run on this machine:
#   1. maximum throughput, closed loop, 32 connections, 0 ms backend:
#      (a) one gateway on the single-node default (SQLite, local limiter),
#      (b) one replica in cluster mode (private Redis + PostgreSQL),
#      (b') the same replica with prepaid accounts (quota reservations in Redis too),
#      (c) two replicas, the load split evenly (two load generators, 16 connections each);
#   2. latency at one fixed open-loop rate (50 % of (b)'s maximum) for the
#      simulator straight, (a) and (b): the shared path's ADDED p50 / p99;
#   3. Redis per task, from a private redis-server's INFO commandstats and
#      INFO cpu before/after each run (calls, script µs and server CPU µs per
#      task), and the heartbeat alone while idle;
#   4. PostgreSQL durable events per second through the store's group commit
#      (`cargo bench --bench recorder`, group recorder-postgres);
#   5. with OLD_BIN=<tollgate binary built before cluster mode>: the
#      single-node default, old against new, interleaved, 3 rounds, median.
# Writes target/bench/cluster.json and .md.
# Usage: [OLD_BIN=…] [PG=postgres://postgres@127.0.0.1:5432] [RECORDER=0] \
#        benches/cluster.sh [seconds per run] [accounts]
# Needs redis-server, redis-cli, psql and a PostgreSQL server that lets PG's
# user create a database (it makes tollgate_bench_<random> and drops it).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
ACCOUNTS=${2:-100}
TARGET=${CARGO_TARGET_DIR:-target}
BIN=$TARGET/release/tollgate
PG=${PG:-postgres://postgres@127.0.0.1:5432}
TOKEN=bench-admin-token-0123456789
OUT=target/bench
mkdir -p "$OUT"
cargo build --release --quiet --bin tollgate
work=$(mktemp -d)
DB=tollgate_bench_$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')
PREFIX=tgbench-$DB
REDIS_PID=
cleanup() {
  kill $(jobs -p) 2>/dev/null || true
  wait 2>/dev/null || true
  [ -n "$REDIS_PID" ] && kill "$REDIS_PID" 2>/dev/null || true
  psql "$PG/postgres" -qAtc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
  [ -n "${KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

wait_for_lines() { for _ in $(seq 400); do [ "$(grep -c http "$1" 2>/dev/null)" -ge "$2" ] && return; sleep 0.05; done; echo "timeout: $1" >&2; cat "${1%.out}.err" >&2 || true; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# The backend double, 0 ms.
$BIN simulate --listen 127.0.0.1:0 --latency-ms 0 --jitter-ms 0 >"$work/sim.out" 2>/dev/null &
wait_for_lines "$work/sim.out" 1
SIM=$(grep -o 'http://[0-9.:]*' "$work/sim.out")

# A private Redis: its counters and CPU are this bench's alone.
RPORT=$(free_port)
redis-server --bind 127.0.0.1 --port "$RPORT" --save "" --appendonly no >"$work/redis.log" 2>&1 &
REDIS_PID=$!
for _ in $(seq 100); do redis-cli -p "$RPORT" ping >/dev/null 2>&1 && break; sleep 0.05; done
REDIS_URL="redis://127.0.0.1:$RPORT/0"
psql "$PG/postgres" -qAtc "CREATE DATABASE $DB" >/dev/null
PG_URL="$PG/$DB"

config() { # name data_dir [cluster]
  cat >"$work/$1.toml" <<TOML
[server]
listen = "127.0.0.1:0"
instance = "$1"
[admin]
listen = "127.0.0.1:0"
token = "$TOKEN"
[backend]
url = "$SIM"
[limits]
max_queue_per_account = 20000
max_queue_wait_ms = 120000
[storage]
data_dir = "$2"
[log]
level = "warn"
TOML
  if [ "${3:-}" = cluster ]; then
    printf '[cluster]\nredis_url = "%s"\nkey_prefix = "%s"\n' "$REDIS_URL" "$PREFIX" >>"$work/$1.toml"
  fi
}
declare -A GW ADMIN PID
start_gw() { # name binary [cluster]
  config "$1" "$work/data-$1" "${3:-}"
  if [ "${3:-}" = cluster ]; then
    TOLLGATE_STORAGE_KIND=postgres TOLLGATE_STORAGE_POSTGRES_URL="$PG_URL" \
      "$2" serve --config "$work/$1.toml" >"$work/$1.out" 2>"$work/$1.err" &
  else
    "$2" serve --config "$work/$1.toml" >"$work/$1.out" 2>"$work/$1.err" &
  fi
  PID[$1]=$!
  wait_for_lines "$work/$1.out" 2
  GW[$1]=$(grep 'data plane' "$work/$1.out" | grep -o 'http://[0-9.:]*')
  ADMIN[$1]=$(grep 'admin' "$work/$1.out" | grep -o 'http://[0-9.:]*')
}

auth=(-H "Authorization: Bearer $TOKEN" -H "Content-Type: application/json")
new_account() { # admin id [prepaid] -> prints its key
  curl -sf "${auth[@]}" -X POST "$1/v1/accounts" -d "{\"id\":\"$2\"}" >/dev/null
  curl -sf "${auth[@]}" -X PUT "$1/v1/accounts/$2/postpaid" -d '{"enabled":true}' >/dev/null
  if [ -n "${3:-}" ]; then
    curl -sf "${auth[@]}" -X POST "$1/v1/accounts/$2/resource-packages" -d '{"size":1000000}' >/dev/null
  fi
  curl -sf "${auth[@]}" -X POST "$1/v1/accounts/$2/keys" -d '{}' | sed 's/.*"api_key":"\([^"]*\)".*/\1/'
  echo
}
accounts() { # name admin [prepaid]
  for i in $(seq 1 "$ACCOUNTS"); do new_account "$2" "$1-$i" "${3:-}"; done >"$work/keys-$1.txt"
}

lg() { # out url keys [loadgen args…]
  local out=$1 url=$2 keys=$3
  shift 3
  $BIN loadgen --json --keys-file "$keys" --url "$url/v1/style-transfer" "$@" >"$work/$out.json"
}
redis_snap() { # name: INFO commandstats + cpu of the private Redis
  redis-cli -p "$RPORT" info commandstats >"$work/redis-$1.txt"
  redis-cli -p "$RPORT" info cpu >>"$work/redis-$1.txt"
}
stat_cpu() { awk '/^cpu / {print $2+$3+$4+$5+$6+$7+$8, $5+$6}' /proc/stat; } # total jiffies, idle+iowait
measured() { # name: Redis snapshots and machine CPU around a load run
  local name=$1
  shift
  redis_snap "$name-before"
  local c0 c1
  c0=$(stat_cpu)
  "$@"
  c1=$(stat_cpu)
  redis_snap "$name-after"
  echo "$c0 $c1" >"$work/cpu-$name.txt"
}

echo "setup: simulator, private Redis :$RPORT, database $DB, gateways" >&2
measured baseline sleep "$SECS" # Redis's own idle CPU, nobody connected
start_gw single "$BIN"
start_gw gw-a "$BIN" cluster
accounts single "${ADMIN[single]}"
accounts post "${ADMIN[gw-a]}"
accounts pre "${ADMIN[gw-a]}" prepaid

# Warm-up: every account uses up its 50 free units (afterwards a postpaid
# account's quota needs no Redis), connections and pools warm.
WARM=$(( ACCOUNTS * 50 / 2000 + 3 ))
lg warm-single "${GW[single]}" "$work/keys-single.txt" --connections 32 --duration "${WARM}s"
lg warm-a "${GW[gw-a]}" "$work/keys-post.txt" --connections 32 --duration "${WARM}s"
lg warm-pre "${GW[gw-a]}" "$work/keys-pre.txt" --connections 32 --duration "${WARM}s"

echo "1/5 throughput, closed loop, 32 connections, ${SECS}s each" >&2
measured tp-single lg tp-single "${GW[single]}" "$work/keys-single.txt" --connections 32 --duration "${SECS}s"
measured tp-cluster lg tp-cluster "${GW[gw-a]}" "$work/keys-post.txt" --connections 32 --duration "${SECS}s"
measured tp-prepaid lg tp-prepaid "${GW[gw-a]}" "$work/keys-pre.txt" --connections 32 --duration "${SECS}s"
MAX=$(python3 -c "import json; print(int(json.load(open('$work/tp-cluster.json'))['throughput_rps']))")
RATE=$(( MAX / 2 ))

echo "2/5 heartbeat alone: ${SECS}s idle, one replica" >&2
measured idle sleep "$SECS"

# Which script each call was: MONITOR during a short prepaid run (not
# measured otherwise: MONITOR costs Redis CPU), calls counted by SHA1.
L=src/cluster/lua
{
  for f in acquire leave refuse set_limit pool_beat; do echo "$(cat $L/pool.lua $L/$f.lua | sha1sum | cut -c1-40) $f"; done
  for f in reserve settle quota_beat; do echo "$(cat $L/quota.lua $L/$f.lua | sha1sum | cut -c1-40) $f"; done
  echo "$(sha1sum <$L/instances.lua | cut -c1-40) instances"
} >"$work/shas.txt"
redis-cli -p "$RPORT" monitor >"$work/monitor.txt" &
MON=$!
sleep 0.2
lg attr "${GW[gw-a]}" "$work/keys-pre.txt" --connections 32 --duration 2s
sleep 0.2
kill "$MON" 2>/dev/null || true
wait "$MON" 2>/dev/null || true

echo "3/5 latency at $RATE req/s (50 % of (b)), open loop" >&2
lg lat-sim "$SIM" "$work/keys-single.txt" --rate "$RATE" --duration "${SECS}s"
lg lat-single "${GW[single]}" "$work/keys-single.txt" --rate "$RATE" --duration "${SECS}s"
measured lat-cluster lg lat-cluster "${GW[gw-a]}" "$work/keys-post.txt" --rate "$RATE" --duration "${SECS}s"

echo "4/5 two replicas, 16 connections each" >&2
start_gw gw-b "$BIN" cluster
lg warm-b "${GW[gw-b]}" "$work/keys-post.txt" --connections 16 --duration 2s
two() {
  lg tp-two-a "${GW[gw-a]}" "$work/keys-post.txt" --connections 16 --duration "${SECS}s" &
  local p=$!
  lg tp-two-b "${GW[gw-b]}" "$work/keys-post.txt" --connections 16 --duration "${SECS}s"
  wait "$p"
}
E0=$(psql "$PG_URL" -qAtc "SELECT count(*) FROM usage_events")
measured tp-two two
sleep 1
E1=$(psql "$PG_URL" -qAtc "SELECT count(*) FROM usage_events")
echo "$E0 $E1" >"$work/events-two.txt"

echo "5/5 PostgreSQL group commit (cargo bench --bench recorder -- recorder-postgres)" >&2
if [ "${RECORDER:-1}" != 0 ]; then
  # The gateways stay up but idle; the bench has its own tables in $DB.
  psql "$PG/postgres" -qAtc "CREATE DATABASE ${DB}_rec" >/dev/null
  TOLLGATE_BENCH_POSTGRES="$PG/${DB}_rec" cargo bench --quiet --bench recorder -- recorder-postgres \
    >"$work/recorder.txt" 2>&1 || true
  psql "$PG/postgres" -qAtc "DROP DATABASE IF EXISTS ${DB}_rec WITH (FORCE)" >/dev/null || true
  cp "$TARGET/criterion/recorder-postgres/512 concurrent durable events/new/estimates.json" \
    "$work/recorder-pg.json" 2>/dev/null || true
fi

if [ -n "${OLD_BIN:-}" ]; then
  echo "+ single node, old ($OLD_BIN) against new, interleaved, 3 rounds" >&2
  # Both fresh (same data size), started together, order alternated.
  kill "${PID[gw-b]}" "${PID[gw-a]}" "${PID[single]}" 2>/dev/null || true
  start_gw old "$OLD_BIN"
  start_gw new "$BIN"
  accounts old "${ADMIN[old]}"
  accounts new "${ADMIN[new]}"
  lg warm-old "${GW[old]}" "$work/keys-old.txt" --connections 32 --duration "${WARM}s"
  lg warm-new "${GW[new]}" "$work/keys-new.txt" --connections 32 --duration "${WARM}s"
  for r in 1 2 3; do
    order="old new"
    [ "$r" = 2 ] && order="new old"
    for v in $order; do
      lg ab-$v-$r "${GW[$v]}" "$work/keys-$v.txt" --connections 32 --duration "${SECS}s"
    done
  done
fi

python3 - "$work" "$SECS" "$ACCOUNTS" "$RATE" "$OUT" "${OLD_BIN:-}" <<'PY'
import json, sys, os, platform, statistics
work, secs, accounts, rate, out, old_bin = sys.argv[1:]
secs, accounts, rate = int(secs), int(accounts), int(rate)
def load(n):
    return json.load(open(f"{work}/{n}.json"))
def snap(n):
    stats, cpu = {}, 0.0
    for line in open(f"{work}/redis-{n}.txt"):
        line = line.strip()
        if line.startswith("cmdstat_"):
            name, kv = line[len("cmdstat_"):].split(":", 1)
            d = dict(x.split("=") for x in kv.split(","))
            stats[name] = (int(d["calls"]), int(d["usec"]))
        elif line.startswith(("used_cpu_sys:", "used_cpu_user:")):
            cpu += float(line.split(":")[1])
    return stats, cpu
def redis(name, tasks):
    (b, cb), (a, ca) = snap(f"{name}-before"), snap(f"{name}-after")
    cmds = {}
    for k in a:
        if k in ("info",):  # the bench's own snapshots
            continue
        calls = a[k][0] - b.get(k, (0, 0))[0]
        usec = a[k][1] - b.get(k, (0, 0))[1]
        if calls:
            cmds[k] = {"calls": calls, "usec": usec,
                       "calls_per_task": calls / tasks if tasks else None,
                       "usec_per_task": usec / tasks if tasks else None}
    cpu_us = (ca - cb) * 1e6
    top = [k for k in cmds if k in TOP]
    per = lambda f: sum(cmds[k][f] for k in top) / tasks if tasks else None
    return {"tasks": tasks, "commands": cmds,
            # What replicas send: scripts (and, rarely, SUBSCRIBE/PING); the
            # rest ran inside the scripts, and their time is in the script's.
            "round_trips_per_task": per("calls"),
            "script_usec_per_task": per("usec"),
            "inner_calls_per_task": sum(c["calls"] for k, c in cmds.items() if k not in TOP) / tasks if tasks else None,
            "server_cpu_us": cpu_us, "server_cpu_us_per_task": cpu_us / tasks if tasks else None}
TOP = {"evalsha", "eval", "script|load", "script", "subscribe", "ping", "hello", "client|setinfo", "client|setname", "select"}
def machine_cpu(name):
    t0, i0, t1, i1 = map(int, open(f"{work}/cpu-{name}.txt").read().split())
    return 1 - (i1 - i0) / (t1 - t0)
def row(r):
    return {"rps": r["throughput_rps"], "requests": r["requests"], "ok": r["ok_2xx"],
            "p50_ms": r["latency_ms"]["p50"], "p99_ms": r["latency_ms"]["p99"],
            "p999_ms": r["latency_ms"]["p999"], "statuses": r["statuses"], "errors": r["error_codes"]}

res = {"machine": {"cores": os.cpu_count(), "kernel": platform.release()}, "seconds": secs,
       "accounts": accounts, "throughput": {}, "redis": {}}
tp = res["throughput"]
for key, name in [("a_single", "tp-single"), ("b_cluster", "tp-cluster"), ("b_prepaid", "tp-prepaid")]:
    r = load(name)
    tp[key] = row(r)
    tp[key]["machine_busy"] = machine_cpu(name)
    res["redis"][key] = redis(name, r["requests"])
ra, rb = load("tp-two-a"), load("tp-two-b")
tp["c_two"] = {"rps": ra["throughput_rps"] + rb["throughput_rps"], "requests": ra["requests"] + rb["requests"],
               "ok": ra["ok_2xx"] + rb["ok_2xx"], "per_replica": [row(ra), row(rb)],
               "p50_ms": max(ra["latency_ms"]["p50"], rb["latency_ms"]["p50"]),
               "p99_ms": max(ra["latency_ms"]["p99"], rb["latency_ms"]["p99"]),
               "machine_busy": machine_cpu("tp-two")}
res["redis"]["c_two"] = redis("tp-two", tp["c_two"]["requests"])
e0, e1 = map(int, open(f"{work}/events-two.txt").read().split())
res["events_two"] = {"events": e1 - e0, "ok": tp["c_two"]["ok"], "events_per_s": (e1 - e0) / secs}
lat = {k: row(load(n)) for k, n in [("simulator", "lat-sim"), ("a_single", "lat-single"), ("b_cluster", "lat-cluster")]}
res["latency"] = {"rate": rate, **lat}
res["redis"]["b_open_loop"] = redis("lat-cluster", load("lat-cluster")["requests"])
idle, base = redis("idle", 1), redis("baseline", 1)
res["redis_baseline_cpu_us_per_s"] = base["server_cpu_us"] / secs
res["heartbeat_idle"] = {"seconds": secs, "scripts_per_s": idle["round_trips_per_task"] / secs,
                         "script_usec_per_s": idle["script_usec_per_task"] / secs,
                         "server_cpu_us_per_s": idle["server_cpu_us"] / secs,
                         "server_cpu_us_per_s_over_baseline": (idle["server_cpu_us"] - base["server_cpu_us"]) / secs,
                         "commands": idle["commands"]}
shas = dict(l.split() for l in open(f"{work}/shas.txt"))
attr, inner, attr_tasks = {}, {}, load("attr")["requests"]
for line in open(f"{work}/monitor.txt", errors="replace"):
    parts = line.split('"')
    if len(parts) < 2:
        continue
    cmd = parts[1].lower()
    if "[0 lua]" in parts[0]:
        inner[cmd] = inner.get(cmd, 0) + 1
        continue
    key = f"{cmd} {shas.get(parts[3], parts[3][:12])}" if cmd == "evalsha" and len(parts) > 3 else cmd
    attr[key] = attr.get(key, 0) + 1
res["attribution_prepaid"] = {"tasks": attr_tasks, "sent": attr, "inside_scripts": inner}
try:
    est = json.load(open(f"{work}/recorder-pg.json"))
    ns = est["mean"]["point_estimate"]
    res["postgres_recorder"] = {"events_per_s": 512 / (ns / 1e9), "ns_per_512": ns}
except (OSError, KeyError, ValueError):
    res["postgres_recorder"] = None
if old_bin:
    old = [load(f"ab-old-{i}")["throughput_rps"] for i in (1, 2, 3)]
    new = [load(f"ab-new-{i}")["throughput_rps"] for i in (1, 2, 3)]
    p99o = [load(f"ab-old-{i}")["latency_ms"]["p99"] for i in (1, 2, 3)]
    p99n = [load(f"ab-new-{i}")["latency_ms"]["p99"] for i in (1, 2, 3)]
    p50o = [load(f"ab-old-{i}")["latency_ms"]["p50"] for i in (1, 2, 3)]
    p50n = [load(f"ab-new-{i}")["latency_ms"]["p50"] for i in (1, 2, 3)]
    res["old_vs_new"] = {"old_bin": old_bin, "old_rps": old, "new_rps": new,
                         "old_p50": p50o, "new_p50": p50n, "old_p99": p99o, "new_p99": p99n,
                         "median_old": statistics.median(old), "median_new": statistics.median(new)}
json.dump(res, open(f"{out}/cluster.json", "w"), indent=2)

md = [f"Machine: {os.cpu_count()} cores, Linux {platform.release()}; {accounts} accounts (postpaid, free units used up "
      f"in a warm-up; (b') prepaid: a 1,000,000-unit package each); {secs} s per run; load generator, simulator, "
      "gateways, Redis and PostgreSQL all on the same cores.\n",
      "### Closed loop, 32 connections, 0 ms backend\n",
      "| setup | req/s | p50 ms | p99 ms | machine CPU busy | non-2xx |", "|---|---:|---:|---:|---:|---|"]
names = {"a_single": "(a) single node (SQLite, local limiter)", "b_cluster": "(b) one replica, cluster (Redis + PostgreSQL)",
         "b_prepaid": "(b') one replica, cluster, prepaid accounts", "c_two": "(c) two replicas, 16 + 16 connections"}
for k, r in tp.items():
    bad = {s: n for s, n in (r.get("statuses") or {}).items() if not str(s).startswith("2")}
    if k == "c_two":
        bad = {}
        for p in r["per_replica"]:
            for s, n in p["statuses"].items():
                if not str(s).startswith("2"):
                    bad[s] = bad.get(s, 0) + n
    md.append(f"| {names[k]} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['machine_busy']*100:.0f} % | {bad or '-'} |")
c = tp["c_two"]
md.append(f"\n(c) per replica: " + "; ".join(f"{p['rps']:.0f} req/s, p50 {p['p50_ms']:.2f} / p99 {p['p99_ms']:.2f} ms" for p in c["per_replica"])
          + f" (the row shows the sum of req/s and the worse replica's percentiles). Events committed to PostgreSQL during (c): "
          f"{res['events_two']['events']} for {res['events_two']['ok']} successes, {res['events_two']['events_per_s']:.0f}/s.\n")
md.append(f"### Open loop at {rate} req/s (50 % of (b)'s maximum), latency from each request's due time\n")
md.append("| target | p50 ms | p99 ms | p99.9 ms | non-2xx |\n|---|---:|---:|---:|---|")
for k, label in [("simulator", "simulator straight"), ("a_single", "(a) single node"), ("b_cluster", "(b) one replica, cluster")]:
    r = lat[k]
    bad = {s: n for s, n in r["statuses"].items() if not str(s).startswith("2")}
    md.append(f"| {label} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['p999_ms']:.2f} | {bad or '-'} |")
a, b, s = lat["a_single"], lat["b_cluster"], lat["simulator"]
md.append(f"\nShared path added over the local limiter at {rate} req/s: p50 **{b['p50_ms'] - a['p50_ms']:+.2f} ms**, "
          f"p99 **{b['p99_ms'] - a['p99_ms']:+.2f} ms** (over the simulator straight: single node {a['p50_ms'] - s['p50_ms']:+.2f} / "
          f"{a['p99_ms'] - s['p99_ms']:+.2f}, cluster {b['p50_ms'] - s['p50_ms']:+.2f} / {b['p99_ms'] - s['p99_ms']:+.2f}).\n")
md.append("### Redis per task (private redis-server, INFO commandstats and INFO cpu before/after)\n")
md.append("| run | tasks | round trips (scripts) per task | script µs per task | Redis CPU µs per task (user+sys) | commands run inside the scripts per task |")
md.append("|---|---:|---:|---:|---:|---:|")
for k, label in [("b_cluster", "(b) closed loop"), ("b_prepaid", "(b') closed loop, prepaid"), ("c_two", "(c) two replicas"),
                 ("b_open_loop", f"(b) open loop {rate}/s")]:
    r = res["redis"][k]
    md.append(f"| {label} | {r['tasks']} | {r['round_trips_per_task']:.3f} | {r['script_usec_per_task']:.2f} | {r['server_cpu_us_per_task']:.2f} | {r['inner_calls_per_task']:.1f} |")
h = res["heartbeat_idle"]
md.append(f"\nRound trips are the scripts replicas send (EVALSHA); a script's µs (commandstats) include the commands it runs. "
          f"Redis CPU includes its own networking and housekeeping (idle, nobody connected: {res['redis_baseline_cpu_us_per_s']:.0f} µs/s).\n")
md.append(f"Idle replica, {secs} s after the last load (heartbeat only; pools used in the last 4 leases are still beaten): "
          f"{h['scripts_per_s']:.2f} scripts/s, {h['script_usec_per_s']:.1f} µs script time/s, "
          f"{h['server_cpu_us_per_s_over_baseline']:.0f} µs/s Redis CPU over the idle baseline.\n")
md.append(f"Per script, from MONITOR during a separate 2 s prepaid run ({attr_tasks} tasks; MONITOR's own cost makes this run's "
          "throughput meaningless), sent per task: " + ", ".join(f"{k} {v / attr_tasks:.3f}" for k, v in sorted(attr.items()))
          + "; run inside the scripts per task: " + ", ".join(f"{k} {v / attr_tasks:.2f}" for k, v in sorted(inner.items())) + ".\n")
pg = res["postgres_recorder"]
md.append("### PostgreSQL group commit\n")
if pg:
    md.append(f"`cargo bench --bench recorder -- recorder-postgres` (512 concurrent durable events through the PostgreSQL "
              f"store's writer, one transaction per batch, fsync and synchronous_commit on): **{pg['events_per_s']:,.0f} events/s**.\n")
else:
    md.append("not measured (RECORDER=0 or the bench failed; see recorder.txt with KEEP=1)\n")
if old_bin:
    o = res["old_vs_new"]
    md.append("### Single-node default, before and after cluster mode (closed loop, 32 connections; both gateways fresh, started together; rounds old-new, new-old, old-new)\n")
    md.append("| round | old req/s | new req/s | old p50 / p99 ms | new p50 / p99 ms |\n|---:|---:|---:|---|---|")
    for i in range(3):
        md.append(f"| {i+1} | {o['old_rps'][i]:.0f} | {o['new_rps'][i]:.0f} | {o['old_p50'][i]:.2f} / {o['old_p99'][i]:.2f} | {o['new_p50'][i]:.2f} / {o['new_p99'][i]:.2f} |")
    md.append(f"\nmedian: old **{o['median_old']:.0f}**, new **{o['median_new']:.0f}** req/s (new / old = {o['median_new'] / o['median_old']:.3f}); old binary {old_bin}\n")
open(f"{out}/cluster.md", "w").write("\n".join(md) + "\n")
print("\n".join(md))
PY
