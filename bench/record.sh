#!/usr/bin/env bash
# The benchmark record in BENCHMARKS.md, all in one session on one machine:
# the pgbench per-message ceiling, backlog drains (spread, hot item, 1/2/4
# workers), the Python baseline, and latency at fixed rates up to half the
# measured capacity.
# Ends with the ratios the targets are stated in.
#
#   bench/record.sh [MESSAGES]      (default 50000)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-50000}
cargo build --release --quiet
out=$(mktemp -d)
figure() { python3 bench/figure.py < "$1"; }
rate_of() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['throughput_per_sec'])" "$1"; }

pgbench_tps=$(bench/pgbench.sh 20 | awk '{print $3}')
echo "pgbench, one transaction per message, 16 clients: $pgbench_tps tps"
bench/drain.sh 1 "" --messages "$n" --items 100 > "$out/spread.json"
echo "drain $n, 100 items, 1 worker:    $(figure "$out/spread.json")"
bench/drain.sh 1 "" --messages "$n" --items 1 > "$out/hot.json"
echo "drain $n, one hot item, 1 worker: $(figure "$out/hot.json")"
for w in 2 4; do
  bench/drain.sh "$w" "" --messages "$n" --items 100 > "$out/workers-$w.json"
  echo "drain $n, 100 items, $w workers:    $(figure "$out/workers-$w.json")"
done

# The Python baseline runs in its own virtualenv, with pinned client libraries.
venv=${XDG_CACHE_HOME:-$HOME/.cache}/qty-worker/bench-venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check pika==1.4.4 'psycopg[binary]==3.3.9'
python_n=$((n / 5))
WORKER_CMD="$venv/bin/python bench/python_worker.py" bench/drain.sh 1 "" --messages "$python_n" --items 100 > "$out/python.json"
echo "drain $python_n, Python worker:   $(figure "$out/python.json")"

# Latency at fixed rates up to half the drain capacity just measured, with the
# worker already consuming. The bench publishes on the same 2 cores meanwhile.
half=$(python3 -c "print(int(float('$(rate_of "$out/spread.json")') / 2))")
suffix=$(date +%s%N)
db=qtyw_rate_$suffix
export DATABASE_URL=postgres://postgres@127.0.0.1:5432/$db QTY_EXCHANGE=bench-rate-$suffix QTY_QUEUE=bench-rate-$suffix.adjust
http=127.0.0.1:19465
target/release/qty-worker --log-format json run --http-addr $http 2>/dev/null &
worker=$!
trap 'kill -TERM $worker 2>/dev/null; wait $worker; bench/forget-names.sh "$QTY_EXCHANGE" "$QTY_QUEUE"; psql -q -h 127.0.0.1 -U postgres -c "drop database if exists $db" postgres' EXIT
for _ in $(seq 1 100); do
  curl -fs "http://$http/readyz" >/dev/null && break
  kill -0 $worker || { echo "the worker exited" >&2; exit 1; }
  sleep 0.1
done
for rate in ${RATES:-2000 4000 $half}; do
  target/release/qty-worker bench --json --rate "$rate" --messages $((n / 2)) --items 100 > "$out/rate.json"
  echo "rate $rate/s for $((n / 2)) requests: $(figure "$out/rate.json")"
done

python3 - "$pgbench_tps" "$(rate_of "$out/spread.json")" "$(rate_of "$out/hot.json")" "$(rate_of "$out/python.json")" <<'PY'
import sys
pgbench, spread, hot, python = map(float, sys.argv[1:])
print(f"ratios: drain/pgbench {spread / pgbench:.2f}, hot/spread {hot / spread:.2f}, "
      f"qty-worker/Python {spread / python:.1f}")
PY
