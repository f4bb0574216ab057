#!/usr/bin/env bash
# One backlog drain: publish N requests with no worker running, start W workers,
# time the drain from the first reply to the last, and report the workers' peak
# RSS, the CPU time each process spent (seconds, in `cpu_secs`) and the workers'
# context switches (`worker_context_switches`). Extra
# arguments go to `qty-worker bench`. QTY_BIN picks the binary (default
# target/release/qty-worker); WORKER_CMD runs another worker instead;
# WORKER_DATABASE_URL_TEMPLATE (a URL with `{db}` where the database name goes)
# gives the workers another way to the run's database (a PgBouncer in front of it, say:
# bench/pgbouncer.sh).
#
#   bench/drain.sh WORKERS "WORKER FLAGS" [BENCH FLAGS…]
#   bench/drain.sh 1 "--prefetch 500" --messages 50000 --items 100
set -euo pipefail
cd "$(dirname "$0")/.."
workers=${1:?number of workers}
worker_flags=${2:-}
shift 2 || shift $#
bin=${QTY_BIN:-target/release/qty-worker}
suffix=$(date +%s%N)
# A fresh database per run, so no run pays for the ledger its predecessors grew.
db=qtyw_bench_$suffix
export DATABASE_URL=${BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/$db}
export QTY_EXCHANGE=bench-$suffix QTY_QUEUE=bench-$suffix.adjust QTY_LOG_FORMAT=json
log=$(mktemp -d)

cleanup() {
  # A process may be gone already (a worker that died, a bench that finished);
  # `|| true` keeps errexit from skipping the rest of the clean-up.
  for pid in "${pids[@]:-}" "${bench_pid:-}"; do
    [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  bench/forget-names.sh "$QTY_EXCHANGE" "$QTY_QUEUE"
  [ -n "${BENCH_DATABASE_URL:-}" ] || psql -q -h 127.0.0.1 -U postgres -c "drop database if exists $db with (force)" postgres
}
trap cleanup EXIT

# The bench, like every operator command, needs a database `migrate` made.
"$bin" migrate --log-format json 2> "$log/migrate.log" || { cat "$log/migrate.log" >&2; exit 1; }

pids=()
fifo=$log/bench.err
mkfifo "$fifo"
"$bin" bench --backlog --json "$@" > "$log/report.json" 2> "$fifo" &
bench_pid=$!
# Wait until the backlog is published before starting any worker. A bench that
# stops first (a flag it refuses, say) closes the fifo: say what it said, rather
# than start workers and then wait for ever on a fifo nobody writes.
published=""
while IFS= read -r line; do
  case "$line" in *"backlog published"*) published=1; break ;; esac
  printf '%s\n' "$line" >> "$log/bench.log"
done < "$fifo"
if [ -z "$published" ]; then
  echo "the bench stopped before the backlog was published; it said:" >&2
  cat "$log/bench.log" >&2 2>/dev/null || true
  exit 1
fi
cat "$fifo" > /dev/null &

# CPU use, in clock ticks, so runs can be compared per message as well as per second.
source bench/cpu.sh
broker_pid=$(find_broker)
broker_before=$(ticks "$broker_pid") bench_before=$(ticks "$bench_pid") busy_before=$(busy)
database_before=$(database)

worker_database_url=$DATABASE_URL
[ -z "${WORKER_DATABASE_URL_TEMPLATE:-}" ] || worker_database_url=${WORKER_DATABASE_URL_TEMPLATE//\{db\}/$db}
pids=()
for n in $(seq 1 "$workers"); do
  if [ -n "${WORKER_CMD:-}" ]; then
    # Another worker to compare against, e.g. WORKER_CMD="python3 bench/python_worker.py".
    $WORKER_CMD 2> "$log/worker-$n.log" &
  else
    # shellcheck disable=SC2086
    DATABASE_URL=$worker_database_url \
      "$bin" run --http-addr 127.0.0.1:0 --queue "$QTY_QUEUE" $worker_flags 2> "$log/worker-$n.log" &
  fi
  pids+=($!)
done
peak=0 worker_ticks=0 bench_ticks=0 worker_switches=0
while kill -0 "$bench_pid" 2>/dev/null; do
  sum=0
  for n in "${!pids[@]}"; do
    pid=${pids[$n]}
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "worker $((n + 1)) exited before the drain ended; its log:" >&2
      tail -n 20 "$log/worker-$((n + 1)).log" >&2
      exit 1
    fi
    hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    [ "${hwm:-0}" -gt "$peak" ] && peak=$hwm
    sum=$((sum + $(ticks "$pid")))
  done
  worker_ticks=$sum
  sum=0
  for pid in "${pids[@]}"; do sum=$((sum + $(switches "$pid"))); done
  worker_switches=$sum
  t=$(ticks "$bench_pid"); [ "$t" -gt 0 ] && bench_ticks=$((t - bench_before))
  sleep 0.2
done
wait "$bench_pid"
broker_ticks=$(( $(ticks "$broker_pid") - broker_before )) busy_ticks=$(( $(busy) - busy_before ))
database_ticks=$(( $(database) - database_before ))
python3 - "$log/report.json" "$peak" "$workers" "$(getconf CLK_TCK)" \
  "$worker_ticks" "$broker_ticks" "$bench_ticks" "$database_ticks" "$busy_ticks" "$worker_switches" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
report["workers"] = int(sys.argv[3])
report["worker_peak_rss_mib"] = round(int(sys.argv[2]) / 1024, 1)
hz = int(sys.argv[4])
worker, broker, bench, database, busy = (int(t) / hz for t in sys.argv[5:10])
# CPU seconds from the workers' start to the last reply. "rest" is the whole
# machine's busy time minus the others: the kernel's network work, mostly.
report["cpu_secs"] = {
    "workers": round(worker, 2),
    "broker": round(broker, 2),
    "database": round(database, 2),
    "bench": round(bench, 2),
    "rest": round(busy - worker - broker - bench - database, 2),
}
report["worker_context_switches"] = int(sys.argv[10])
print(json.dumps(report))
PY
