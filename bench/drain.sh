#!/usr/bin/env bash
# One backlog drain: publish N requests with no worker running, start W workers,
# time the drain from the first reply to the last, and report the workers' peak
# RSS. Extra arguments go to `qty-worker bench`.
#
#   bench/drain.sh WORKERS "WORKER FLAGS" [BENCH FLAGS…]
#   bench/drain.sh 1 "--prefetch 500" --messages 50000 --items 100
set -euo pipefail
cd "$(dirname "$0")/.."
workers=${1:?number of workers}
worker_flags=${2:-}
shift 2 || shift $#
bin=target/release/qty-worker
suffix=$(date +%s%N)
export DATABASE_URL=${BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/qtyw_bench}
export QTY_EXCHANGE=bench-$suffix QTY_QUEUE=bench-$suffix.adjust QTY_LOG_FORMAT=json
log=$(mktemp -d)

cleanup() {
  for pid in "${pids[@]:-}"; do [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null; done
  wait 2>/dev/null || true
  bench/forget-names.sh "$QTY_EXCHANGE" "$QTY_QUEUE"
}
trap cleanup EXIT

pids=()
fifo=$log/bench.err
mkfifo "$fifo"
"$bin" bench --backlog --json "$@" > "$log/report.json" 2> "$fifo" &
bench_pid=$!
# Wait until the backlog is published before starting any worker.
while IFS= read -r line; do
  case "$line" in *"backlog published"*) break ;; esac
done < "$fifo"
cat "$fifo" > /dev/null &

pids=()
for n in $(seq 1 "$workers"); do
  if [ -n "${WORKER_CMD:-}" ]; then
    # Another worker to compare against, e.g. WORKER_CMD="python3 bench/python_worker.py".
    $WORKER_CMD 2> "$log/worker-$n.log" &
  else
    # shellcheck disable=SC2086
    "$bin" run --http-addr 127.0.0.1:0 --queue "$QTY_QUEUE" $worker_flags 2> "$log/worker-$n.log" &
  fi
  pids+=($!)
done
peak=0
while kill -0 "$bench_pid" 2>/dev/null; do
  for pid in "${pids[@]}"; do
    hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    [ "${hwm:-0}" -gt "$peak" ] && peak=$hwm
  done
  sleep 0.2
done
wait "$bench_pid"
python3 - "$log/report.json" "$peak" "$workers" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
report["workers"] = int(sys.argv[3])
report["worker_peak_rss_mib"] = round(int(sys.argv[2]) / 1024, 1)
print(json.dumps(report))
PY
