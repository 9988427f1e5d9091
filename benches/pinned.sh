#!/usr/bin/env bash
# Exact side-by-side CPU cost per request: tollgate vs nginx vs HAProxy.
#
# The server side (a static nginx backend answering 2 KiB to POST, plus the
# proxy under test) is pinned to cpu0; the load generator (wrk -t1 -c64,
# POST, keep-alive) runs alone on cpu1. Targets are interleaved round by
# round and the median of the rounds is reported. CPU per request on cpu0 is
# the busy jiffies /proc/stat counts on cpu0 during the wrk window divided by
# the requests wrk completed (the backend's share is included for every
# target, so differences between targets are the proxies' own).
#
# Then, open loop at 50 % of tollgate's measured maximum (tollgate loadgen on
# cpu1; BENCH_OPEN_RATE=N for N req/s instead), each target warmed up first
# at half that rate for BENCH_WARMUP seconds (2; 0 for none): p50/p99
# latency of the backend straight and through tollgate; the difference is
# tollgate's added latency.
#
# tollgate runs with everything on: key auth, per-account limiter, billing
# reservation (postpaid accounts), a durable usage event (SQLite, fsync'd
# before the answer) per success. Its data directory is on the same disk as
# the repository (not tmpfs).
#
# BENCH_CLUSTER=1 adds the cluster path (Redis + PostgreSQL) as
# "tollgate-cluster", with its own open loop at 50 % of its maximum.
# BENCH_DATA_ROOT=/dev/shm/x puts the data directories there (tmpfs: to
# tell the disk's fsync latency from the gateway's own).
#
# Usage: benches/pinned.sh [seconds per run] [rounds]
# Writes target/bench/pinned.md and pinned.json. Needs 2 or more cores.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
ROUNDS=${2:-3}
ACCOUNTS=64
BIN=${BENCH_BIN:-target/release/tollgate}
TOKEN=bench-admin-token-0123456789
OUT=target/bench
mkdir -p "$OUT"
[ -n "${BENCH_BIN:-}" ] || cargo build --release --quiet --bin tollgate
for tool in wrk nginx haproxy; do
  command -v $tool >/dev/null 2>&1 || [ -x /usr/sbin/$tool ] || {
    echo "installing $tool from Debian's packages" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $tool >/dev/null
  }
done
export PATH=$PATH:/usr/sbin
work=$(mktemp -d -p "$PWD/target")
cleanup() { kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$work"; }
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 200); do curl -s -o /dev/null "$1" && return; sleep 0.05; done; echo "timeout: $1" >&2; exit 1; }
nginx_common() { # $1 = dir
  cat <<CONF
worker_processes 1;
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 4096; }
CONF
}
temp_paths() {
  echo "client_body_temp_path $1/body; proxy_temp_path $1/proxy; fastcgi_temp_path $1/fcgi; uwsgi_temp_path $1/uwsgi; scgi_temp_path $1/scgi;"
}

# The backend: static nginx, 2 KiB JSON reply to any method.
BPORT=$(free_port)
mkdir -p "$work/backend"
REPLY=$(python3 -c 'print("{\"Response\":{\"ResultImage\":\"" + "A" * 2000 + "\",\"RequestId\":\"r\"}}")')
cat >"$work/backend/nginx.conf" <<CONF
$(nginx_common "$work/backend")
http {
  access_log off;
  $(temp_paths "$work/backend")
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$BPORT;
    client_max_body_size 10m;
    location / { default_type application/json; return 200 '$REPLY'; }
  }
}
CONF
taskset -c 0 nginx -c "$work/backend/nginx.conf" -g 'daemon off;' &
BACKEND="http://127.0.0.1:$BPORT"
wait_http "$BACKEND/"

# nginx as a plain reverse proxy, one worker, upstream keep-alive.
NPORT=$(free_port)
mkdir -p "$work/nginx"
cat >"$work/nginx/nginx.conf" <<CONF
$(nginx_common "$work/nginx")
http {
  access_log off;
  $(temp_paths "$work/nginx")
  keepalive_requests 1000000;
  upstream backend { server 127.0.0.1:$BPORT; keepalive 128; keepalive_requests 1000000; }
  server {
    listen 127.0.0.1:$NPORT;
    location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
CONF
taskset -c 0 nginx -c "$work/nginx/nginx.conf" -g 'daemon off;' &
NGINX="http://127.0.0.1:$NPORT"

# HAProxy, one thread.
HPORT=$(free_port)
cat >"$work/haproxy.cfg" <<CONF
global
  nbthread 1
  maxconn 8000
defaults
  mode http
  timeout connect 5s
  timeout client 120s
  timeout server 120s
  http-reuse always
frontend fe
  bind 127.0.0.1:$HPORT
  default_backend be
backend be
  server b 127.0.0.1:$BPORT maxconn 10000
CONF
taskset -c 0 haproxy -f "$work/haproxy.cfg" -db >"$work/haproxy.log" 2>&1 &
HAPROXY="http://127.0.0.1:$HPORT"

# tollgate, everything on, the whole process on cpu0. With BENCH_BASE_BIN
# set, a second build runs beside it ("tollgate-base", on a copy of the same
# data directory, so the same keys work) for an A/B in the same run.
start_gw() { # name binary [extra log lines] -> sets GW_<name>, ADMIN_<name>
  local name=$1 bin=$2
  cat >"$work/$name.toml" <<TOML
[server]
listen = "127.0.0.1:0"
max_connections = 20000
[admin]
listen = "127.0.0.1:0"
token = "$TOKEN"
[backend]
url = "$BACKEND"
[limits]
max_queue_per_account = 20000
[storage]
data_dir = "${BENCH_DATA_ROOT:-$work}/data-$name"
[log]
level = "${BENCH_LOG_LEVEL:-warn}"
${3:-}
TOML
  taskset -c 0 "$bin" serve --config "$work/$name.toml" >"$work/$name.out" 2>"$work/$name.err" &
  printf -v "PID_$name" '%s' $!
  for _ in $(seq 200); do [ "$(grep -c http "$work/$name.out" 2>/dev/null)" -ge 2 ] && break; sleep 0.05; done
  printf -v "GW_$name" '%s' "$(grep 'data plane' "$work/$name.out" | grep -o 'http://[0-9.:]*')"
  printf -v "ADMIN_$name" '%s' "$(grep 'admin' "$work/$name.out" | grep -o 'http://[0-9.:]*')"
}
start_gw tollgate "$BIN"
GW=$GW_tollgate
ADMIN=$ADMIN_tollgate
wait_http "$NGINX/"
wait_http "$HAPROXY/"

# 64 postpaid accounts, one key each: every task is paid.
auth=(-H "Authorization: Bearer $TOKEN" -H "Content-Type: application/json")
make_keys() { # admin url -> one key per line
  for i in $(seq 1 $ACCOUNTS); do
    curl -sf "${auth[@]}" -X POST "$1/v1/accounts" -d "{\"id\":\"pin-$i\"}" >/dev/null
    curl -sf "${auth[@]}" -X PUT "$1/v1/accounts/pin-$i/postpaid" -d '{"enabled":true}' >/dev/null
    curl -sf "${auth[@]}" -X POST "$1/v1/accounts/pin-$i/keys" -d '{}' | sed 's/.*"api_key":"\([^"]*\)".*/\1/'
    echo
  done
}
make_keys "$ADMIN" >"$work/keys.txt"
# tollgate-keyed: the same gateway, every request with its own
# Idempotency-Key (the cost of a key per task: its body read first, the
# key's store read and in-progress marker, the stored answer committed with
# the event).
TARGETS=(backend nginx haproxy tollgate tollgate-keyed)
# BENCH_TARGETS="nginx tollgate": only these (nginx is always measured: the
# ratios are to it).
[ -z "${BENCH_TARGETS:-}" ] || read -r -a TARGETS <<<"${BENCH_TARGETS/nginx/} nginx"
declare -A URL=([backend]="$BACKEND" [nginx]="$NGINX" [haproxy]="$HAPROXY" [tollgate]="$GW" [tollgate-keyed]="$GW")
if [ -n "${BENCH_BASE_BIN:-}" ]; then
  kill "$(pgrep -f "$work/tollgate.toml")"; wait "$(pgrep -f "$work/tollgate.toml")" 2>/dev/null || sleep 1
  cp -r "${BENCH_DATA_ROOT:-$work}/data-tollgate" "${BENCH_DATA_ROOT:-$work}/data-base"
  start_gw tollgate "$BIN"
  # BENCH_BASE_LOG: extra [log] lines for the base only (e.g. `access =
  # false` to measure the access log with BENCH_BASE_BIN = the same build).
  start_gw base "$BENCH_BASE_BIN" "${BENCH_BASE_LOG:-}"
  URL[tollgate]=$GW_tollgate
  URL[tollgate-keyed]=$GW_tollgate
  URL[tollgate-base]=$GW_base
  TARGETS+=(tollgate-base)
fi

# BENCH_STREAM=1: the same build once more ("tollgate-stream", on a copy of
# the data directory) with usage events published to NATS JetStream, to a
# private nats-server pinned beside the load generator on cpu1, so cpu0
# counts tollgate's own added CPU and not the NATS server's.
if [ -n "${BENCH_STREAM:-}" ]; then
  NATS_PORT=$(free_port)
  mkdir -p "$work/nats"
  taskset -c 1 "$(command -v nats-server || echo /usr/sbin/nats-server)" -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$work/nats" >/dev/null 2>&1 &
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$NATS_PORT") 2>/dev/null && break; sleep 0.05; done
  kill "$(pgrep -f "$work/tollgate.toml")"; wait "$(pgrep -f "$work/tollgate.toml")" 2>/dev/null || sleep 1
  cp -r "${BENCH_DATA_ROOT:-$work}/data-tollgate" "${BENCH_DATA_ROOT:-$work}/data-stream"
  start_gw tollgate "$BIN"
  start_gw stream "$BIN" "[events]
stream = \"nats\"
nats_url = \"nats://127.0.0.1:$NATS_PORT\"
subject = \"pin\"
stream_name = \"PIN\""
  URL[tollgate]=$GW_tollgate
  URL[tollgate-keyed]=$GW_tollgate
  [ -n "${BENCH_BASE_BIN:-}" ] && URL[tollgate-base]=$GW_base
  URL[tollgate-stream]=$GW_stream
  TARGETS+=(tollgate-stream)
fi

# wrk: POST, 200-byte JSON body; requests take the 64 keys in turn, so the
# 64 requests in flight belong to (nearly always) distinct accounts and none
# waits in a queue (an account's limit is 3).
lua_of() { # keys file -> wrk script
python3 - "$1" <<'PY'
import sys
keys = [k.strip() for k in open(sys.argv[1]) if k.strip()]
print("local keys = {" + ",".join('"%s"' % k for k in keys) + "}")
print('''
local n = 0
local body = '{"Image":"' .. string.rep("x", 180) .. '","Style":"ink"}'
request = function()
  n = n + 1
  local k = keys[(n % #keys) + 1]
  return wrk.format("POST", "/v1/style-transfer", {["Authorization"] = "Bearer " .. k, ["Content-Type"] = "application/json"}, body)
end''')
PY
}
lua_of "$work/keys.txt" >"$work/post.lua"
# The same with a key per request, unique across runs (a repeated key
# would be a replay, not a task).
sed -e 's/^local n = 0$/local n = 0\nmath.randomseed(os.time())\nlocal run = os.time() .. "-" .. math.random(1, 1000000000)/' \
    -e 's/\["Content-Type"\] = "application\/json"}/["Content-Type"] = "application\/json", ["Idempotency-Key"] = "pin-" .. run .. "-" .. n}/' \
    "$work/post.lua" >"$work/post-keyed.lua"
grep -q Idempotency-Key "$work/post-keyed.lua"
script_of() {
  case $1 in
    tollgate-keyed) echo "$work/post-keyed.lua" ;;
    tollgate-cluster) echo "$work/post-cluster.lua" ;;
    *) echo "$work/post.lua" ;;
  esac
}
keys_of() { [ "$1" = tollgate-cluster ] && echo "$work/keys-cluster.txt" || echo "$work/keys.txt"; }

# BENCH_CLUSTER=1: the same build once more ("tollgate-cluster") in cluster
# mode: the limiter and the quota in a private Redis, the store in a fresh
# PostgreSQL database (the machine's server on 127.0.0.1:5432). Redis is
# pinned beside the load generator on cpu1; PostgreSQL runs where the
# system puts it, so cpu0's count may include some of it.
if [ -n "${BENCH_CLUSTER:-}" ]; then
  RPORT=$(free_port)
  taskset -c 1 redis-server --bind 127.0.0.1 --port "$RPORT" --save "" --appendonly no >"$work/redis.log" 2>&1 &
  for _ in $(seq 100); do redis-cli -p "$RPORT" ping >/dev/null 2>&1 && break; sleep 0.05; done
  PG=${PG:-postgres://postgres@127.0.0.1:5432}
  PGDB=tollgate_pin_$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')
  psql "$PG/postgres" -qAtc "CREATE DATABASE $PGDB" >/dev/null
  trap 'cleanup; psql "$PG/postgres" -qAtc "DROP DATABASE IF EXISTS $PGDB WITH (FORCE)" >/dev/null 2>&1 || true' EXIT
  TOLLGATE_STORAGE_KIND=postgres TOLLGATE_STORAGE_POSTGRES_URL="$PG/$PGDB" start_gw cluster "$BIN" "[cluster]
redis_url = \"redis://127.0.0.1:$RPORT/0\"
key_prefix = \"tgpin-$PGDB\""
  make_keys "$ADMIN_cluster" >"$work/keys-cluster.txt"
  lua_of "$work/keys-cluster.txt" >"$work/post-cluster.lua"
  URL[tollgate-cluster]=$GW_cluster
  TARGETS+=(tollgate-cluster)
fi

cpu0() { awk '$1=="cpu0" {busy=$2+$3+$4+$7+$8+$9; print busy, busy+$5+$6}' /proc/stat; }
measure() { # name url -> appends "name rps us_per_req" to results
  local name=$1 url=$2 before after out rps reqs
  before=$(cpu0)
  # BENCH_PROFILE=1: the last round's tollgate run under `perf record -g`
  # on cpu0 (everything cpu0 runs, kernel included).
  if [ -n "${BENCH_PROFILE:-}" ] && [ "$name" = tollgate ] && [ "$r" = "$ROUNDS" ]; then
    perf record -q ${BENCH_PERF_ARGS:--g -C 0} -o "$OUT/pinned.perf.data" -- sleep "$SECS" 2>/dev/null &
  fi
  # BENCH_STRACE=1: the same run's system calls counted (`strace -c -f`;
  # slows it, so only the counts per request mean anything).
  if [ -n "${BENCH_STRACE:-}" ] && [ "$name" = tollgate ] && [ "$r" = "$ROUNDS" ]; then
    timeout -s INT "$SECS" strace ${BENCH_STRACE_ARGS:--c} -f -p "$PID_tollgate" -o "$OUT/pinned.strace.txt" &
    ps -T -o tid,comm -p "$PID_tollgate" >"$OUT/pinned.threads.txt"
  fi
  out=$(taskset -c 1 wrk -t1 -c64 -d"${SECS}s" -s "$(script_of "$name")" "$url/v1/style-transfer")
  after=$(cpu0)
  reqs=$(echo "$out" | awk '/requests in/ {print $1}')
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  non2xx=$(echo "$out" | awk '/Non-2xx/ {print $NF}')
  python3 - "$name" "$before" "$after" "$reqs" "$rps" "${non2xx:-0}" >>"$work/results.txt" <<'PY'
import os, sys
name, before, after, reqs, rps, bad = sys.argv[1:]
b0, t0 = map(int, before.split()); b1, t1 = map(int, after.split())
hz = os.sysconf("SC_CLK_TCK")
busy_s = (b1 - b0) / hz
print(name, rps, f"{busy_s * 1e6 / max(int(reqs), 1):.2f}", f"{(b1 - b0) / max(t1 - t0, 1):.3f}", bad)
PY
  tail -1 "$work/results.txt" >&2
}

# warm every target (connection pools, page cache, SQLite file size)
for t in "${TARGETS[@]}"; do
  taskset -c 1 wrk -t1 -c64 -d2s -s "$(script_of "$t")" "${URL[$t]}/v1/style-transfer" >/dev/null
done
for r in $(seq 1 "$ROUNDS"); do
  echo "round $r/$ROUNDS" >&2
  for t in "${TARGETS[@]}"; do measure "$t" "${URL[$t]}"; done
done

if [ -n "${BENCH_STREAM:-}" ]; then
  # The publisher's own rate: events still to publish when the last round
  # ended, then how fast they drain with no load.
  scrape() { curl -s "$ADMIN_stream/metrics" | awk -v m="$1" '$1==m {print $2}'; }
  lag0=$(scrape tollgate_stream_lag_events); pub0=$(scrape tollgate_stream_published_total); t0=$(date +%s.%N)
  for _ in $(seq 600); do [ "$(scrape tollgate_stream_lag_events)" = "0" ] && break; sleep 0.1; done
  pub1=$(scrape tollgate_stream_published_total); t1=$(date +%s.%N)
  python3 - "$lag0" "$pub0" "$pub1" "$t0" "$t1" >"$work/stream.txt" <<'PY'
import sys
lag0, pub0, pub1, t0, t1 = sys.argv[1:]
n = float(pub1) - float(pub0)
dt = float(t1) - float(t0)
print(f"{float(lag0):.0f} {n:.0f} {dt:.2f} {n / dt if dt > 0 and n > 0 else 0:.0f} {float(pub1):.0f}")
PY
  echo "stream: $(cat "$work/stream.txt") (lag at the end of the rounds, drained, seconds, events/s, published in all)" >&2
fi

# open loop at 50 % of tollgate's maximum: added latency
MAX=$(awk '$1=="tollgate" {print $2}' "$work/results.txt" | sort -n | awk '{a[NR]=$1} END {print int(a[int((NR+1)/2)])}')
# BENCH_OPEN_RATE=N: the open loop at N req/s instead of 50 % of the maximum.
RATE=${BENCH_OPEN_RATE:-$(( MAX / 2 ))}
echo "open loop at $RATE req/s" >&2
# Each target first takes half the rate for BENCH_WARMUP seconds (default
# 2, not measured), then the measured run follows at once: on this kind of
# VM a core that was idle for half a second or more answers its first
# requests slowly (nginx alone: 4 to 7 ms for one request after 2 s idle,
# under 1 ms after 50 ms), and that start, not the steady state, was what
# the p99 of a cold open loop measured. Half the rate: a cold start at the
# full rate piles up a backlog, the load generator opens a connection per
# request waiting, and every proxy here serves fewer requests a second the
# more connections it holds (nginx: 49,600 req/s at 64, 21,700 at 2,000),
# so the run could end still digging out (BENCHMARKS.md, round 2).
WARMUP=${BENCH_WARMUP:-2}
for t in backend tollgate ${BENCH_BASE_BIN:+tollgate-base}; do
  url=${URL[$t]}
  if [ "$WARMUP" != 0 ]; then
    taskset -c 1 "$BIN" loadgen --json --duration "${WARMUP}s" --keys-file "$(keys_of "$t")" --body-size 200 \
      --rate "$(( RATE > 1 ? RATE / 2 : 1 ))" --url "$url/v1/style-transfer" >"$work/warm-$t.json"
  fi
  taskset -c 1 "$BIN" loadgen --json --duration "${SECS}s" --keys-file "$(keys_of "$t")" --body-size 200 \
    --rate "$RATE" --url "$url/v1/style-transfer" >"$work/lat-$t.json"
done
# The cluster path at 50 % of its own maximum (and the backend straight at
# that rate, for its added latency).
if [ -n "${BENCH_CLUSTER:-}" ]; then
  CMAX=$(awk '$1=="tollgate-cluster" {print $2}' "$work/results.txt" | sort -n | awk '{a[NR]=$1} END {print int(a[int((NR+1)/2)])}')
  CRATE=$(( CMAX / 2 ))
  echo "cluster open loop at $CRATE req/s" >&2
  for t in backend tollgate-cluster; do
    taskset -c 1 "$BIN" loadgen --json --duration "${SECS}s" --keys-file "$(keys_of "$t")" --body-size 200 \
      --rate "$CRATE" --url "${URL[$t]}/v1/style-transfer" >"$work/clat-$t.json"
  done
  python3 - "$work" "$CRATE" >"$work/cluster-lat.txt" <<'PY'
import json, sys
work, rate = sys.argv[1:]
b = json.load(open(f"{work}/clat-backend.json"))["latency_ms"]
c = json.load(open(f"{work}/clat-tollgate-cluster.json"))
l = c["latency_ms"]
print(f"Cluster path, open loop at {rate} req/s (50 % of its maximum): backend straight p50 {b['p50']:.3f} / p99 {b['p99']:.3f} ms; "
      f"through tollgate-cluster p50 {l['p50']:.3f} / p99 {l['p99']:.3f} ms: **added p50 {l['p50'] - b['p50']:.3f} ms, p99 {l['p99'] - b['p99']:.3f} ms**; statuses {c['statuses']}")
PY
  cat "$work/cluster-lat.txt" >&2
fi


python3 - "$work" "$SECS" "$ROUNDS" "$OUT" "$RATE" <<'PY'
import json, os, platform, statistics, sys
work, secs, rounds, out, rate = sys.argv[1:]
rows = {}
for line in open(f"{work}/results.txt"):
    name, rps, us, frac, bad = line.split()
    rows.setdefault(name, []).append((float(rps), float(us), float(frac), int(bad)))
med = {n: {"rps": statistics.median(r[0] for r in v), "us_per_req": statistics.median(r[1] for r in v),
           "cpu0_busy": statistics.median(r[2] for r in v), "non_2xx": sum(r[3] for r in v),
           "rounds": [{"rps": r[0], "us_per_req": r[1]} for r in v]} for n, v in rows.items()}
lat = {t: json.load(open(f"{work}/lat-{t}.json")) for t in ["backend", "tollgate", "tollgate-base"] if os.path.exists(f"{work}/lat-{t}.json")}
res = {"machine": {"cores": os.cpu_count(), "kernel": platform.release()}, "seconds": int(secs), "rounds": int(rounds),
       "targets": med, "open_loop": {"rate": int(rate), **{t: {"p50_ms": l["latency_ms"]["p50"], "p99_ms": l["latency_ms"]["p99"],
       "statuses": l["statuses"]} for t, l in lat.items()}}}
json.dump(res, open(f"{out}/pinned.json", "w"), indent=2)
md = [f"Pinned side by side: server side on cpu0, wrk -t1 -c64 on cpu1, POST 200 B, 2 KiB reply, {secs} s x {rounds} interleaved rounds, median.\n",
      "| target | req/s | CPU µs per request on cpu0 (backend included) | cpu0 busy | x nginx throughput |", "|---|---:|---:|---:|---:|"]
n = med["nginx"]["rps"]
for t in ["backend", "nginx", "haproxy", "tollgate", "tollgate-keyed", "tollgate-base", "tollgate-stream", "tollgate-cluster"]:
    if t not in med:
        continue
    m = med[t]
    md.append(f"| {t} | {m['rps']:,.0f} | {m['us_per_req']:.1f} | {m['cpu0_busy']:.0%} | {m['rps'] / n:.2f} |")
bad = med["tollgate"]["non_2xx"]
md.append(f"\ntollgate non-2xx answers over all rounds: {bad}\n")
if "tollgate-keyed" in med:
    k, t = med["tollgate-keyed"], med["tollgate"]
    md.append(f"An idempotency key per task: {k['us_per_req'] - t['us_per_req']:+.1f} µs of cpu0 per request "
              f"({k['rps'] / t['rps']:.2f}x the throughput without a key); keyed non-2xx: {k['non_2xx']}\n")
    import sqlite3
    db = sqlite3.connect(f"{work}/data-tollgate/tollgate.db")
    n = db.execute("SELECT count(*) FROM idempotency_keys").fetchone()[0]
    try:
        size = db.execute("SELECT sum(pgsize) FROM dbstat WHERE name LIKE '%idempotency_keys%'").fetchone()[0]
        md.append(f"Remembered keys in the store: {n:,}, {size / max(n, 1):,.0f} bytes each (table and its indexes, "
                  f"2 KiB answers included; dbstat)\n")
    except sqlite3.OperationalError:
        md.append(f"Remembered keys in the store: {n:,}\n")

if "tollgate-stream" in med:
    k, t = med["tollgate-stream"], med["tollgate"]
    md.append(f"Usage events on NATS JetStream: {k['us_per_req'] - t['us_per_req']:+.1f} µs of cpu0 per task "
              f"({k['rps'] / t['rps']:.2f}x the throughput with the stream off); non-2xx: {k['non_2xx']}\n")
    if os.path.exists(f"{work}/stream.txt"):
        lag0, drained, dt, drain_rate, total = open(f"{work}/stream.txt").read().split()
        md.append(f"The publisher: {total} events published in all; {lag0} still to publish when the last round ended, "
                  f"drained at {drain_rate} events/s ({drained} in {dt} s, no load)\n")

b = res["open_loop"]["backend"]
md.append(f"Open loop at {rate} req/s (50 % of tollgate's maximum), backend straight: p50 {b['p50_ms']:.3f} ms / p99 {b['p99_ms']:.3f} ms\n")
for t in ["tollgate", "tollgate-base"]:
    if t in res["open_loop"]:
        g = res["open_loop"][t]
        md.append(f"- through {t}: p50 {g['p50_ms']:.3f} ms / p99 {g['p99_ms']:.3f} ms; **added p50 {g['p50_ms'] - b['p50_ms']:.3f} ms, p99 {g['p99_ms'] - b['p99_ms']:.3f} ms**; statuses {g['statuses']}")
if os.path.exists(f"{work}/cluster-lat.txt"):
    md.append("\n" + open(f"{work}/cluster-lat.txt").read())
open(f"{out}/pinned.md", "w").write("\n".join(md) + "\n")
print("\n".join(md))
PY
