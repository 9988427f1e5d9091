# Shared by the bench scripts (sourced): a work directory cleaned up on
# exit, a simulator and a gateway on ports the OS picks, accounts with keys.
# Expects BIN (a tollgate binary) and TOKEN (the admin token) to be set.

# bench_workdir [parent dir] -> sets $work; everything started is killed
# and the directory removed on exit (KEEP=1 keeps it).
bench_workdir() {
  work=$(mktemp -d ${1:+-p "$1"})
  trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
  ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
}

# wait_lines FILE N: until FILE holds N lines naming an http:// address.
wait_lines() {
  for _ in $(seq 200); do
    [ "$(grep -c http "$1" 2>/dev/null)" -ge "$2" ] && return
    sleep 0.05
  done
  echo "timeout: $1" >&2
  exit 1
}

# free_port -> prints a TCP port free on 127.0.0.1 now.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start_simulator [simulate flags...] -> sets $SIM.
start_simulator() {
  $BIN simulate --listen 127.0.0.1:0 "$@" >"$work/sim.out" 2>/dev/null &
  wait_lines "$work/sim.out" 1
  SIM=$(grep -o 'http://[0-9.:]*' "$work/sim.out")
}

# start_gateway BACKEND_URL [extra TOML] -> sets $GW, $ADMIN, $GW_PID.
# Listeners on free ports, the bench token, data in $work/data, log level
# warn unless the extra TOML sets one (the fixed keys come as TOLLGATE_*
# variables, so the extra TOML may have any section).
start_gateway() {
  local extra=${2:-}
  printf '%s\n' "$extra" >"$work/gw.toml"
  local level=()
  case "$extra" in *"[log]"*) ;; *) level=(TOLLGATE_LOG_LEVEL=warn) ;; esac
  env TOLLGATE_SERVER_LISTEN=127.0.0.1:0 TOLLGATE_ADMIN_LISTEN=127.0.0.1:0 \
    TOLLGATE_ADMIN_TOKEN="$TOKEN" TOLLGATE_BACKEND_URL="$1" \
    TOLLGATE_STORAGE_DATA_DIR="$work/data" "${level[@]}" \
    $BIN serve --config "$work/gw.toml" >"$work/gw.out" 2>"$work/gw.err" &
  GW_PID=$!
  wait_lines "$work/gw.out" 2
  GW=$(grep 'data plane' "$work/gw.out" | grep -o 'http://[0-9.:]*')
  ADMIN=$(grep 'admin' "$work/gw.out" | grep -o 'http://[0-9.:]*')
  auth=(-H "Authorization: Bearer $TOKEN" -H "Content-Type: application/json")
}

# new_account ID [free] -> prints a key of a new account (postpaid unless
# "free": then its 50 free units only).
new_account() {
  curl -sf "${auth[@]}" -X POST "$ADMIN/v1/accounts" -d "{\"id\":\"$1\"}" >/dev/null
  [ "${2:-}" = free ] ||
    curl -sf "${auth[@]}" -X PUT "$ADMIN/v1/accounts/$1/postpaid" -d '{"enabled":true}' >/dev/null
  curl -sf "${auth[@]}" -X POST "$ADMIN/v1/accounts/$1/keys" -d '{}' |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["api_key"])'
}
