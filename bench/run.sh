#!/usr/bin/env bash
# The README's HTTP benchmark: preload 100k keys with an email index, then wrk -t2 -c64 -d10s
# against /set/get, /set/put and /index/query, ROUNDS times each; prints every run and the medians.
# Usage: bash bench/run.sh            (needs wrk: apt-get install -y wrk)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
KEYS=${KEYS:-100000}
PORT=${PORT:-18555}
DURATION=${DURATION:-10s}
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk" >&2; exit 1; }
[ -x .venv/bin/fuckbase ] || { python3 -m venv .venv && .venv/bin/pip install -q .; }
data=$(mktemp -d)
out=bench/results; mkdir -p "$out"
.venv/bin/fuckbase --host 127.0.0.1 --port "$PORT" --data-dir "$data" --log-level info --log-file "$data/server.log" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$data"' EXIT
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.1; done
.venv/bin/python bench/load.py --url "http://127.0.0.1:$PORT" --keys "$KEYS" --index basic
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
for script in get put query; do
  cat "bench/lua/$script.lua" bench/lua/report.lua > "$data/$script.lua"
  for round in $(seq "$ROUNDS"); do
    line=$(KEYS=$KEYS wrk -t2 -c64 -d"$DURATION" -s "$data/$script.lua" "http://127.0.0.1:$PORT" | grep RESULT)
    echo "$script round $round: $line"
    echo "$line" | sed -E 's/.*rps=([0-9]+).*/\1/' >> "$data/$script.rps"
  done
  echo "$script median req/s: $(sort -n "$data/$script.rps" | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')"
done
rss=0  # the fuckbase process plus its granian worker
for p in $pid $(cat /proc/$pid/task/*/children); do rss=$(( rss + $(awk '/VmRSS/ {print $2}' /proc/$p/status) )); done
echo "server RSS after the run: $(( rss / 1024 )) MB"
