#!/usr/bin/env bash
# The worker (release build, its defaults) beside one bad party: a locked item
# with more requests than the prefetch, and a client whose reply queue refuses
# replies. Prints the healthy traffic's figures in each case against healthy
# traffic alone (examples/one_bad_party.rs), and the worker's peak RSS and its
# parked, refused and dead-letter counters. Leaves nothing behind.
#
#   bench/one_bad_party.sh          (QTY_BIN=another/qty-worker to compare a build)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --release --locked --bin qty-worker --example one_bad_party
bin=${QTY_BIN:-target/release/qty-worker}
suffix=$(date +%s%N)
db=qtyw_badparty_$suffix
export DATABASE_URL=postgres://postgres@127.0.0.1:5432/$db
export QTY_EXCHANGE=badparty-$suffix QTY_QUEUE=badparty-$suffix.adjust QTY_LOG_FORMAT=json
export AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f
log=$(mktemp -d)
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cleanup() {
  [ -n "${worker:-}" ] && kill -TERM "$worker" 2>/dev/null || true
  wait 2>/dev/null || true
  bench/forget-names.sh "$QTY_EXCHANGE" "$QTY_QUEUE"
  psql -q -h 127.0.0.1 -U postgres -c "drop database if exists $db with (force)" postgres
  rm -rf "$log"
}
trap cleanup EXIT
"$bin" migrate 2> "$log/migrate.log"
"$bin" run --http-addr "127.0.0.1:$port" 2> "$log/worker.log" &
worker=$!
until curl -sf "http://127.0.0.1:$port/readyz" >/dev/null; do
  kill -0 $worker || { tail "$log/worker.log" >&2; exit 1; }
  sleep 0.1
done
target/release/examples/one_bad_party
metrics=$(curl -s "http://127.0.0.1:$port/metrics")
echo "worker peak RSS: $(awk '/VmHWM/ {printf "%.1f MiB", $2 / 1024}' /proc/$worker/status)"
echo "$metrics" | grep -E '^qty_worker_(replies_refused_total|deliveries_requeued_total|lock_waits_timed_out_total|requests_parked_total|parked_requests) '
echo "dead letters: $(rabbitmqctl -q list_queues name messages | awk -v q="$QTY_QUEUE.dead" '$1 == q {print $2}')"
