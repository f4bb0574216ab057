#!/usr/bin/env bash
# What a request costs at low load, against what its parts cost: in one run,
# over ROUNDS interleaved rounds, at 1,000 requests/s and at a quarter of the
# drain rate measured first,
#   - the worker: `qty-worker bench --rate` publishes at a steady rate and times
#     publish→reply;
#   - the broker part: examples/broker_ceiling.rs (a bare lapin consumer that
#     publishes a confirmed reply to `reply_to`, then acks; no database) under the
#     same bench;
#   - the database part: pgbench running the per-message transaction
#     (bench/per_message.sql: ledger insert, guarded update, COMMIT; prepared) at
#     the same rate;
# the two parts once alone, one after the other, and once at the same time.
# Each line gives p50 and p99 and the CPU per request of the client, RabbitMQ
# and PostgreSQL, and how busy the whole machine was. The end prints the
# medians and the ratios issue 20's targets are stated in, against the parts
# alone and at once.
#
#   bench/record.sh [ROUNDS] [SECONDS]     (defaults 3 and 10)
# QTY_BIN picks the worker binary (default target/release/qty-worker); the
# worker runs with its defaults, and QTY_* variables in the environment reach it.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
secs=${2:-10}
cargo build --release --quiet --bin qty-worker --example broker_ceiling
bin=${QTY_BIN:-target/release/qty-worker}
out=$(mktemp -d)
source bench/cpu.sh

echo "date: $(date -u +%FT%TZ), $(nproc) cores, $($bin --version)"
QTY_BIN=$bin bench/drain.sh 1 "" --messages 20000 --items 1000 > "$out/drain.json"
drain=$(field "$out/drain.json" "int(r['throughput_per_sec'])")
echo "drain of 20000 over 1,000 items: $drain msg/s"

suffix=$(date +%s%N)
worker_db=qtyw_record_$suffix pgbench_db=qtyw_record_pgbench_$suffix
worker_names=bench-record-$suffix broker_names=bench-record-broker-$suffix
http=127.0.0.1:19466
pids=()
cleanup() {
  for pid in "${pids[@]:-}"; do [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  bench/forget-names.sh "$worker_names" "$worker_names.adjust"
  bench/forget-names.sh "$broker_names" "$broker_names.adjust"
  for db in "$worker_db" "$pgbench_db"; do
    psql -q -h 127.0.0.1 -U postgres -c "drop database if exists $db with (force)" postgres
  done
  rm -rf "$out"
}
trap cleanup EXIT

# A worker that has declared NAMES and answers on $http.
start_worker() {
  DATABASE_URL=postgres://postgres@127.0.0.1:5432/$worker_db QTY_EXCHANGE=$1 QTY_QUEUE=$1.adjust \
    "$bin" run --log-format json --http-addr $http 2>/dev/null &
  pids+=($!)
  for _ in $(seq 1 100); do
    curl -fs "http://$http/readyz" >/dev/null && return
    kill -0 $! || { echo "the worker exited" >&2; exit 1; }
    sleep 0.1
  done
  echo "the worker did not become ready" >&2
  exit 1
}
# The broker-only client's queue is declared by a worker that then stops, so
# both clients consume the same topology; the bench's items are created in the
# worker's database (it needs one), which the broker-only client never reads.
start_worker "$broker_names"
kill -TERM "${pids[-1]}"; wait "${pids[-1]}" || true
AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f QTY_QUEUE=$broker_names.adjust \
  target/release/examples/broker_ceiling 2> "$out/broker_ceiling.log" &
pids+=($!)
broker_client=$!
for _ in $(seq 1 100); do
  grep -q consuming "$out/broker_ceiling.log" && break
  sleep 0.1
done
grep -q consuming "$out/broker_ceiling.log" || { echo "broker_ceiling: $(cat "$out/broker_ceiling.log")" >&2; exit 1; }
start_worker "$worker_names"
worker=${pids[-1]}
bench/item_db.sh "$pgbench_db" 1000
broker_pid=$(find_broker)

# One line of the record: ROW RATE P50 P99 CLIENT BROKER DATABASE BUSY%.
record() { printf '%s\n' "$*" >> "$out/rows"; printf '%-13s %6s/s  p50 %6s ms  p99 %6s ms  CPU µs/request: client %4s, broker %4s, database %4s; machine %s%% busy\n' "$@"; }

# Every row is sampled alike: CPU over the run's steady middle (from its second
# second to one second before its end), which leaves out the bench creating its
# 1,000 items (a transaction each) and pgbench's clients connecting; latency over
# every request. Backends that exit take their CPU time with them, so sampling
# while the run is under way is also the only way to see pgbench's.
# window CLIENT_PID (or "" for none): sets c0 b0 d0 busy0 total0 at the start,
# c1 b1 d1 busy1 total1 at the end, and `sampled`, the requests in between.
window() {
  sleep 1.5
  c0=$( [ -n "$1" ] && ticks "$1" || echo 0) b0=$(ticks "$broker_pid") d0=$(database) busy0=$(busy) total0=$(elapsed)
  sleep $((secs - 3))
  c1=$( [ -n "$1" ] && ticks "$1" || echo 0) b1=$(ticks "$broker_pid") d1=$(database) busy1=$(busy) total1=$(elapsed)
  sampled=$((rate * (secs - 3)))
}

# The bench at RATE on the queue of NAMES, in the background.
start_bench() {
  DATABASE_URL=postgres://postgres@127.0.0.1:5432/$worker_db QTY_EXCHANGE=$1 QTY_QUEUE=$1.adjust \
    "$bin" bench --json --rate "$rate" --messages $((rate * secs)) --items 1000 > "$out/rate.json" 2>/dev/null &
  bench=$!
}

# pgbench at RATE in the background, with the fewest clients that keep up (two
# per 1,000/s): each more client is one more backend to wake, and costs
# PostgreSQL CPU.
start_pgbench() {
  rm -f "$out"/pgbench_log*
  pgbench -h 127.0.0.1 -U postgres -n -M prepared -c $(( (rate + 999) / 1000 * 2 )) -j 1 -R "$rate" -T "$secs" \
    -D items=1000 -l --log-prefix="$out/pgbench_log" -f bench/per_message.sql "$pgbench_db" > /dev/null 2>&1 &
  pgbench=$!
}

# The worker's batch-size histogram: the requests it applied, and in how many
# transactions.
batches() { curl -fs "http://$http/metrics" | awk '/^qty_worker_batch_size_sum/ {s = $2} /^qty_worker_batch_size_count/ {c = $2} END {print s, c}'; }

# A row for the bench's run just ended: its latency, the client's CPU and the
# broker's and the database's.
record_bench() {
  record "$1" "$rate" \
    "$(field "$out/rate.json" "f\"{r['latency_ms']['p50']:.2f}\"")" \
    "$(field "$out/rate.json" "f\"{r['latency_ms']['p99']:.2f}\"")" \
    "$(per_request $((c1 - c0)) "$sampled")" \
    "$(per_request $((b1 - b0)) "$sampled")" \
    "$(per_request $((d1 - d0)) "$sampled")" \
    "$(( (busy1 - busy0) * 100 / (total1 - total0) ))"
}

# A row for pgbench's run just ended. Its latency includes the schedule lag, as
# publish→reply includes queueing.
record_pgbench() {
  read -r p50 p99 < <(cat "$out"/pgbench_log* | python3 -c '
import sys
lat = sorted((int(f[2]) + (int(f[6]) if len(f) > 6 else 0)) / 1000 for f in (l.split() for l in sys.stdin))
print(f"{lat[len(lat) // 2]:.2f} {lat[int(len(lat) * 0.99)]:.2f}")')
  record "$1" "$rate" "$p50" "$p99" - - "$(per_request $((d1 - d0)) "$sampled")" \
    "$(( (busy1 - busy0) * 100 / (total1 - total0) ))"
}

# Each round, at each rate: the worker; its two parts alone, one after the
# other; and its two parts at once. The worker's database and broker work share
# the machine, so alone each part has cores the worker never has; at once, each
# sees the other's load, as in the worker (the broker-only client's database
# column is then pgbench's, and is not its own).
for round in $(seq 1 "$rounds"); do
  echo "round $round"
  for rate in 1000 $((drain / 4)); do
    batches0=$(batches); start_bench "$worker_names"; window "$worker"; wait $bench || true
    record_bench qty-worker
    echo "  (qty-worker: $(python3 -c "import sys; (s0, c0), (s1, c1) = (map(float, a.split()) for a in sys.argv[1:]); print(f'{(s1 - s0) / (c1 - c0):.2f}')" "$batches0" "$(batches)") requests per transaction)"
    start_bench "$broker_names"; window "$broker_client"; wait $bench || true
    record_bench broker-only
    start_pgbench; window ""; wait $pgbench
    record_pgbench pgbench
    start_bench "$broker_names"; start_pgbench; window "$broker_client"; wait $bench || true; wait $pgbench
    record_bench broker-beside
    record_pgbench pgbench-beside
  done
done

python3 - "$out/rows" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    row, rate, *figures = line.split()
    rows.setdefault((int(rate), row), []).append([None if f == "-" else float(f) for f in figures])
P50, P99, CLIENT, BROKER, DATABASE, BUSY = range(6)
for rate in sorted({rate for rate, _ in rows}):
    m = lambda row, c: statistics.median(r[c] for r in rows[(rate, row)])
    w = lambda c: m("qty-worker", c)
    print(f"medians at {rate}/s: qty-worker p50 {w(P50):.2f} p99 {w(P99):.2f} ms, client {w(CLIENT):.0f} µs, "
          f"RabbitMQ {w(BROKER):.0f} µs, PostgreSQL {w(DATABASE):.0f} µs, machine {w(BUSY):.0f}% busy")
    for label, broker, pgbench in (("alone", "broker-only", "pgbench"), ("at once", "broker-beside", "pgbench-beside")):
        b = lambda c: m(broker, c)
        p = lambda c: m(pgbench, c)
        print(f"  parts {label}: broker-only p50 {b(P50):.2f} p99 {b(P99):.2f} ms, client {b(CLIENT):.0f} µs; "
              f"pgbench p50 {p(P50):.2f} p99 {p(P99):.2f} ms, PostgreSQL {p(DATABASE):.0f} µs")
        print(f"  ratios against the parts {label} (targets ≤ 1.0, ≤ 1.0, ≤ 1.0, ≤ 1.1): "
              f"p50 worker/(broker+pgbench) {w(P50) / (b(P50) + p(P50)):.2f}, "
              f"p99 {w(P99) / (b(P99) + p(P99)):.2f}, "
              f"PostgreSQL CPU worker/pgbench {w(DATABASE) / p(DATABASE):.2f}, "
              f"client CPU worker/broker-only {w(CLIENT) / b(CLIENT):.2f}")
PY
