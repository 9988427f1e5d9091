# Sourced by benches/e2e.sh: starts nginx and HAProxy as plain reverse
# proxies to the simulator on loopback, installing them from Debian's
# packages when missing. Needs $work and $SIM; sets $NGINX and $HAPROXY.

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

ensure_installed() {
  local missing=()
  command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
  command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]} from Debian's packages" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

start_proxies() {
  ensure_installed
  local sim_addr=${SIM#http://}
  local nport hport
  nport=$(free_port)
  hport=$(free_port)
  mkdir -p "$work/nginx"
  cat >"$work/nginx/nginx.conf" <<CONF
worker_processes auto;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path $work/nginx/body;
  proxy_temp_path $work/nginx/proxy;
  fastcgi_temp_path $work/nginx/fastcgi;
  uwsgi_temp_path $work/nginx/uwsgi;
  scgi_temp_path $work/nginx/scgi;
  upstream backend { server $sim_addr; keepalive 256; }
  server {
    listen 127.0.0.1:$nport;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
CONF
  PATH=$PATH:/usr/sbin nginx -c "$work/nginx/nginx.conf" -g 'daemon off;' 2>>"$work/nginx/error.log" &
  cat >"$work/haproxy.cfg" <<CONF
global
  nbthread $(nproc)
  maxconn 8000
defaults
  mode http
  timeout connect 5s
  timeout client 120s
  timeout server 120s
  http-reuse always
frontend fe
  bind 127.0.0.1:$hport
  default_backend be
backend be
  server sim $sim_addr maxconn 10000
CONF
  PATH=$PATH:/usr/sbin haproxy -f "$work/haproxy.cfg" -db >"$work/haproxy.log" 2>&1 &
  NGINX="http://127.0.0.1:$nport"
  HAPROXY="http://127.0.0.1:$hport"
  for url in "$NGINX" "$HAPROXY"; do
    for _ in $(seq 100); do curl -s -o /dev/null "$url/" && break; sleep 0.05; done
  done
}
