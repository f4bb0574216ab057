#!/usr/bin/env bash
# The ceiling record in BENCHMARKS.md (how much one worker carries), all in one
# session on one machine (bench/record.sh has the low-load record):
#   - the honest per-message ceiling (bench/pgbench.sh: 1,000 items, prepared
#     statements, 16 clients);
#   - backlog drains over 1,000 items and onto one hot item, with peak RSS and
#     CPU per request by process;
#   - the broker's own ceiling for this traffic (examples/broker_ceiling.rs: a
#     lapin consumer that replies and acks, no database);
#   - the Python worker (pika + psycopg);
#   - publish→reply latency at 1,000/s and at half the drain rate just measured.
# Ends with the ratios the targets are stated in.
#
#   bench/ceiling.sh [MESSAGES]      (default 50000)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-50000}
cargo build --release --quiet --bin qty-worker --example broker_ceiling
out=$(mktemp -d)
source bench/cpu.sh
figure() { python3 bench/figure.py < "$1"; }

echo "date: $(date -u +%FT%TZ), $(nproc) cores"
pgbench_tps=$(bench/pgbench.sh 20 1000 | awk '{print $3}')
echo "pgbench, one transaction per message, 1,000 items, -M prepared, 16 clients: $pgbench_tps tps"
bench/drain.sh 1 "" --messages "$n" --items 1000 > "$out/spread.json"
echo "drain $n over 1,000 items:       $(figure "$out/spread.json")"
bench/drain.sh 1 "" --messages "$n" --items 1 > "$out/hot.json"
echo "drain $n onto one hot item:      $(figure "$out/hot.json")"
WORKER_CMD=target/release/examples/broker_ceiling bench/drain.sh 1 "" --messages "$n" --items 1000 > "$out/ceiling.json"
echo "broker only (no database; its replies are placeholders, so no invariants): $(field "$out/ceiling.json" "f\"{r['throughput_per_sec']:.0f} msg/s, client CPU {r['cpu_secs']['workers'] * 1e6 / r['messages']:.0f} µs/request\"")"

# The Python baseline runs in its own virtualenv, with pinned client libraries.
venv=${XDG_CACHE_HOME:-$HOME/.cache}/qty-worker/bench-venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check pika==1.4.4 'psycopg[binary]==3.3.9'
python_n=$((n / 5))
WORKER_CMD="$venv/bin/python bench/python_worker.py" bench/drain.sh 1 "" --messages "$python_n" --items 1000 > "$out/python.json"
echo "drain $python_n, Python worker:   $(figure "$out/python.json")"

# Latency at fixed rates, with the worker already consuming. The bench publishes
# on the same 2 cores meanwhile, so the machine's busy share is printed too. Then
# the same rates through the broker alone (examples/broker_ceiling.rs on the same
# queue, no database): what publishing, the quorum queue and a bare lapin client
# leave of the machine at that rate.
half=$(field "$out/spread.json" "int(r['throughput_per_sec'] / 2)")
suffix=$(date +%s%N)
db=qtyw_rate_$suffix
export DATABASE_URL=postgres://postgres@127.0.0.1:5432/$db QTY_EXCHANGE=bench-rate-$suffix QTY_QUEUE=bench-rate-$suffix.adjust
http=127.0.0.1:19465
target/release/qty-worker run --log-format json --http-addr $http 2>/dev/null &
worker=$!
trap 'kill -TERM $worker 2>/dev/null; wait $worker || true; bench/forget-names.sh "$QTY_EXCHANGE" "$QTY_QUEUE"; psql -q -h 127.0.0.1 -U postgres -c "drop database if exists $db" postgres' EXIT
for _ in $(seq 1 100); do
  curl -fs "http://$http/readyz" >/dev/null && break
  kill -0 $worker || { echo "the worker exited" >&2; exit 1; }
  sleep 0.1
done
broker_pid=$(find_broker)
fixed_rates() {
  local label=$1 rate n client broker database busy_before total_before busy_after total_after
  for rate in ${RATES:-1000 $half}; do
    n=$((rate * 5))
    client=$(ticks $worker) broker=$(ticks "$broker_pid") database=$(database)
    busy_before=$(busy) total_before=$(elapsed)
    # The window includes the bench creating its 1,000 items: under 3 µs a
    # request of database CPU, as the broker-only runs show. The bench itself is
    # left out: its figure would include that set-up.
    target/release/qty-worker bench --json --rate "$rate" --messages $n --items 1000 > "$out/rate.json"
    busy_after=$(busy) total_after=$(elapsed)
    client=$(per_request $(( $(ticks $worker) - client )) $n)
    broker=$(per_request $(( $(ticks "$broker_pid") - broker )) $n)
    database=$(per_request $(( $(database) - database )) $n)
    echo "$label, rate $rate/s for $n requests: $(field "$out/rate.json" "f\"{r['throughput_per_sec']:.0f} msg/s, p50 {r['latency_ms']['p50']:.1f} ms, p99 {r['latency_ms']['p99']:.1f} ms\""); CPU µs/request: client $client, broker $broker, database $database; machine $(( (busy_after - busy_before) * 100 / (total_after - total_before) ))% busy"
  done
}
fixed_rates "qty-worker"
kill -TERM $worker; wait $worker || true
ceiling_log=$out/broker_ceiling.log
target/release/examples/broker_ceiling 2> "$ceiling_log" &
worker=$!
for _ in $(seq 1 100); do
  grep -q consuming "$ceiling_log" && break
  kill -0 $worker || { echo "broker_ceiling exited: $(cat "$ceiling_log")" >&2; exit 1; }
  sleep 0.1
done
fixed_rates "broker only"

python3 - "$pgbench_tps" "$out" <<'PY'
import json, sys
pgbench, out = float(sys.argv[1]), sys.argv[2]
r = {name: json.load(open(f"{out}/{name}.json")) for name in ("spread", "hot", "python", "ceiling")}
rate = {name: report["throughput_per_sec"] for name, report in r.items()}
cpu = r["spread"]["cpu_secs"]["workers"] * 1e6 / r["spread"]["messages"]
print(f"ratios: drain/pgbench {rate['spread'] / pgbench:.2f}, hot/spread {rate['hot'] / rate['spread']:.2f}, "
      f"qty-worker/Python {rate['spread'] / rate['python']:.1f}, drain/broker-only {rate['spread'] / rate['ceiling']:.2f}; "
      f"worker CPU {cpu:.0f} µs/request, peak RSS {r['spread']['worker_peak_rss_mib']} MiB")
PY
