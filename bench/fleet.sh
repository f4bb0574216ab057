#!/usr/bin/env bash
# Partitions measured, on a RabbitMQ node of the script's own with the
# consistent-hash exchange plugin (the system node is never touched), against
# the local PostgreSQL:
#
# 1. one worker, unpartitioned against --partitions P, in alternating backlog
#    drains (as bench/compare.sh does): throughput and worker CPU per request,
#    and their ratios;
# 2. M workers on P partitions: the drain rate;
# 3. a SIGKILLed worker of such a fleet: how long until its partitions are
#    taken by the others (from their "took partition" log lines);
# 4. the broker alone (examples/broker_ceiling.rs, no database) over the one
#    queue against P partition queues: what one queue caps.
#
#   bench/fleet.sh [ROUNDS] [P] [M] [MESSAGES]
#   bench/fleet.sh 3 8 3 50000
#
# QTY_BIN picks the binary (default target/release/qty-worker; build it first).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3} partitions=${2:-8} fleet=${3:-3} messages=${4:-50000}
bin=${QTY_BIN:-target/release/qty-worker}
[ -x "$bin" ] || { echo "no $bin: cargo build --release first" >&2; exit 1; }

# The node: its own name, ports, directories and plugin list (recipe of
# crates/servers/src/rabbitmq.rs).
node_dir=$(mktemp -d /tmp/qtyw-bench-rmq.XXXXXX)
node=qtywbench$$@localhost
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port) dist_port=$(free_port)
stop_node() {
  rabbitmqctl -q -n "$node" stop >/dev/null 2>&1 || true
  pid=$(cat "$node_dir/pid" 2>/dev/null) && kill -9 "$pid" 2>/dev/null || true
  rm -rf "$node_dir"
}
trap stop_node EXIT
echo "[rabbitmq_consistent_hash_exchange]." > "$node_dir/enabled_plugins"
printf 'listeners.tcp.local = 127.0.0.1:%s\nloopback_users = none\n' "$port" > "$node_dir/rabbitmq.conf"
chown -R rabbitmq:rabbitmq "$node_dir"
(cd /var/lib/rabbitmq && runuser -u rabbitmq -- env \
  RABBITMQ_NODENAME="$node" RABBITMQ_NODE_PORT="$port" RABBITMQ_DIST_PORT="$dist_port" \
  RABBITMQ_MNESIA_BASE="$node_dir/mnesia" RABBITMQ_LOG_BASE="$node_dir/log" \
  RABBITMQ_PID_FILE="$node_dir/pid" RABBITMQ_ENABLED_PLUGINS_FILE="$node_dir/enabled_plugins" \
  RABBITMQ_CONFIG_FILE="$node_dir/rabbitmq.conf" \
  /usr/lib/rabbitmq/bin/rabbitmq-server -detached)
rabbitmqctl -q -n "$node" wait "$node_dir/pid" --timeout 120 >/dev/null
export AMQP_URL="amqp://guest:guest@127.0.0.1:$port/%2f"
echo "a RabbitMQ node of its own on port $port, with the consistent-hash exchange" >&2

figures() {
  python3 -c '
import json, sys
r = json.load(sys.stdin)
print(round(r["throughput_per_sec"]), r["invariants_hold"], round(r["cpu_secs"]["workers"] * 1e6 / r["messages"], 1), r["worker_peak_rss_mib"])'
}

echo "== 1. one worker: unpartitioned against $partitions partitions, $rounds rounds of $messages"
results=$(mktemp)
for round in $(seq 1 "$rounds"); do
  for side in one partitioned; do
    if [ "$side" = partitioned ]; then
      report=$(QTY_BIN=$bin bench/drain.sh 1 "--partitions $partitions" --messages "$messages" --items 100 --partitions "$partitions")
    else
      report=$(QTY_BIN=$bin bench/drain.sh 1 "" --messages "$messages" --items 100)
    fi
    line=$(echo "$report" | figures)
    echo "$side $line" >> "$results"
    echo "round $round $side: $line (msg/s, invariants hold, worker CPU µs per request, peak RSS MiB)"
  done
done
python3 - "$results" <<'PY'
import statistics, sys
rate, cpu = {}, {}
for line in open(sys.argv[1]):
    side, r, ok, us, rss = line.split()
    assert ok == "True", "invariants broken"
    rate.setdefault(side, []).append(float(r))
    cpu.setdefault(side, []).append(float(us))
m = {s: statistics.median(v) for s, v in rate.items()}
c = {s: statistics.median(v) for s, v in cpu.items()}
print(f"median drain: {m['one']:.0f} unpartitioned, {m['partitioned']:.0f} partitioned: {m['partitioned'] / m['one']:.2f}x")
print(f"median worker CPU per request: {c['one']:.1f} against {c['partitioned']:.1f} us: {c['partitioned'] / c['one']:.2f}x")
PY

echo "== 2. $fleet workers on $partitions partitions, $messages requests"
logs=$(mktemp -d)
report=$(QTY_BIN=$bin bench/drain.sh "$fleet" "--partitions $partitions" --messages "$messages" --items 100 --partitions "$partitions")
echo "drain: $(echo "$report" | figures) (msg/s, invariants hold, worker CPU µs per request, peak RSS MiB of the largest worker)"

echo "== 3. a SIGKILLed worker's partitions, in a fleet of $fleet"
suffix=$(date +%s%N)
db=qtyw_bench_$suffix
export DATABASE_URL=postgres://postgres@127.0.0.1:5432/$db QTY_EXCHANGE=bench-$suffix QTY_QUEUE=bench-$suffix.adjust
"$bin" migrate --log-format json 2>/dev/null
pids=()
for n in $(seq 1 "$fleet"); do
  "$bin" run --http-addr 127.0.0.1:0 --partitions "$partitions" --log-format json 2> "$logs/kill-$n.log" &
  pids+=($!)
done
owned() { grep -c '"took partition"' "$1" 2>/dev/null || true; }
for _ in $(seq 1 300); do
  total=0
  for n in $(seq 1 "$fleet"); do total=$((total + $(owned "$logs/kill-$n.log"))); done
  [ "$total" -ge "$partitions" ] && break
  sleep 0.1
done
sleep 3
victim_owned=$(( $(owned "$logs/kill-1.log") - $(grep -c '"gave partition up"' "$logs/kill-1.log" || true) ))
killed_at=$(date +%s.%N)
kill -9 "${pids[0]}"
for _ in $(seq 1 300); do
  taken=$(cat "$logs"/kill-[2-9].log 2>/dev/null | grep -c 'its owner stopped renewing' || true)
  [ "$taken" -ge "$victim_owned" ] && break
  sleep 0.1
done
python3 - "$killed_at" "$victim_owned" "$logs"/kill-[2-9].log <<'PY'
import json, sys, datetime
killed = float(sys.argv[1]); expected = int(sys.argv[2])
times = []
for path in sys.argv[3:]:
    for line in open(path):
        if "its owner stopped renewing" in line:
            ts = json.loads(line)["timestamp"]
            at = datetime.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
            times.append(at - killed)
times.sort()
print(f"the killed worker owned {expected}; taken by the others after {', '.join(f'{t:.1f}' for t in times)} s")
PY
for pid in "${pids[@]:1}"; do kill -TERM "$pid" 2>/dev/null || true; done
wait 2>/dev/null || true
psql -q -h 127.0.0.1 -U postgres -c "drop database if exists $db with (force)" postgres
rm -rf "$logs" "$results"

echo "== 4. the broker alone: one queue against $partitions partition queues, $rounds rounds of $messages"
cargo build --release --quiet --example broker_ceiling
ceiling=target/release/examples/broker_ceiling
for round in $(seq 1 "$rounds"); do
  one=$(WORKER_CMD=$ceiling bench/drain.sh 1 "" --messages "$messages" --items 1000 | figures)
  many=$(WORKER_CMD="env QTY_PARTITIONS=$partitions $ceiling" bench/drain.sh 1 "" --messages "$messages" --items 1000 --partitions "$partitions" | figures)
  echo "round $round: one queue ${one%% *} msg/s, $partitions queues ${many%% *} msg/s"
done
