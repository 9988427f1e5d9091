#!/usr/bin/env bash
# Memory with large backend answers: a local Python backend answers 60 MB to
# every POST; three parallel tasks through tollgate, twice; the gateway's
# RSS idle, at its peak (sampled every 50 ms) and 2 s after, then the
# largest resident mappings. Run by hand (BENCHMARKS.md, "Large backend
# answers").
# Usage: benches/large_answers.sh [path to a tollgate binary]
set -euo pipefail
BIN=${1:-target/release/tollgate}
work=$(mktemp -d)
python3 - <<'PY' > $work/port &
import http.server, socketserver, sys
body = b"A" * (60 << 20)
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        n = int(self.headers.get("Content-Length", 0)); self.rfile.read(n)
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer): daemon_threads = True
s = S(("127.0.0.1", 0), H); print(s.server_address[1], flush=True); s.serve_forever()
PY
sleep 1; P=$(cat $work/port)
cat > $work/gw.toml <<T
[server]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
token = "bench-admin-token-0123456789"
[backend]
url = "http://127.0.0.1:$P"
max_response_bytes = 104857600
[storage]
data_dir = "$work/data"
[log]
level = "warn"
T
$BIN serve --config $work/gw.toml > $work/gw.out 2>$work/gw.err &
GWP=$!
sleep 1
GW=$(grep 'data plane' $work/gw.out | grep -o 'http://[0-9.:]*'); AD=$(grep admin $work/gw.out | grep -o 'http://[0-9.:]*')
A=(-H "Authorization: Bearer bench-admin-token-0123456789" -H "Content-Type: application/json")
curl -sf "${A[@]}" -X POST $AD/v1/accounts -d '{"id":"big"}' >/dev/null
curl -sf "${A[@]}" -X PUT $AD/v1/accounts/big/postpaid -d '{"enabled":true}' >/dev/null
K=$(curl -sf "${A[@]}" -X POST $AD/v1/accounts/big/keys -d '{}' | python3 -c 'import json,sys;print(json.load(sys.stdin)["api_key"])')
rss() { awk '/VmRSS/ {print $2}' /proc/$GWP/status; }
echo "idle $(rss) KiB"
peak=0
for round in 1 2; do
  pids=()
  for i in 1 2 3; do curl -s -o /dev/null -H "Authorization: Bearer $K" -X POST $GW/x -d '{}' & pids+=($!); done
  for _ in $(seq 40); do r=$(rss); [ $r -gt $peak ] && peak=$r; sleep 0.05; done
  wait "${pids[@]}"
done
sleep 2
echo "peak $peak KiB, after $(rss) KiB"
awk '/^[0-9a-f]+-[0-9a-f]+ / {name=$6; range=$1} /^Rss:/ {if ($2 > 5000) print $2, range, name}' /proc/$GWP/smaps | sort -rn | head -8
grep -c "^[0-9a-f]*-" /proc/$GWP/maps
kill $GWP; kill $(jobs -p) 2>/dev/null || true
