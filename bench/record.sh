#!/usr/bin/env bash
# The benchmark record in BENCHMARKS.md, all in one session on one machine:
# the pgbench per-message ceiling, backlog drains (spread, hot item, 1/2/4
# workers), p99 latency at about half capacity, and the Python baseline.
#
#   bench/record.sh [MESSAGES]      (default 50000)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-50000}
cargo build --release --quiet
figure() { python3 bench/figure.py; }

echo "pgbench, one transaction per message, 16 clients: $(bench/pgbench.sh 20)"
echo "drain $n, 100 items, 1 worker:        $(bench/drain.sh 1 "" --messages "$n" --items 100 | figure)"
echo "drain $n, one hot item, 1 worker:     $(bench/drain.sh 1 "" --messages "$n" --items 1 | figure)"
for w in 2 4; do
  echo "drain $n, 100 items, $w workers:        $(bench/drain.sh "$w" "" --messages "$n" --items 100 | figure)"
done
# The Python baseline runs in its own virtualenv, with pinned client libraries.
venv=${XDG_CACHE_HOME:-$HOME/.cache}/qty-worker/bench-venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check pika==1.4.4 'psycopg[binary]==3.3.9'
python_n=$((n / 5))
echo "drain $python_n, Python worker:        $(WORKER_CMD="$venv/bin/python bench/python_worker.py" bench/drain.sh 1 "" --messages "$python_n" --items 100 | figure)"

# Latency at a fixed rate, with the worker already consuming.
rate=${RATE:-6000}
export DATABASE_URL=postgres://postgres@127.0.0.1:5432/qtyw_bench QTY_EXCHANGE=bench-rate QTY_QUEUE=bench-rate.adjust
target/release/qty-worker --log-format json run --http-addr 127.0.0.1:0 2>/dev/null &
worker=$!
trap 'kill -TERM $worker 2>/dev/null; wait $worker; bench/forget-names.sh bench-rate bench-rate.adjust' EXIT
sleep 2
echo "rate $rate/s for $((n / 2)) requests:      $(target/release/qty-worker bench --json --rate "$rate" --messages $((n / 2)) --items 100 | figure)"
