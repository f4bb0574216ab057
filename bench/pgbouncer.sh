#!/usr/bin/env bash
# The drain direct against through PgBouncer (transaction pooling, PgBouncer's
# defaults, Debian's 1.18), interleaved over ROUNDS rounds, with the ratio of the
# medians. PgBouncer runs on a free port of its own, in a temporary directory,
# in front of the local PostgreSQL, and is removed at the end.
#
#   bench/pgbouncer.sh [ROUNDS] [BENCH FLAGS…]    (default: 3 rounds, 50,000 requests over 100 items)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
shift || true
[ $# -gt 0 ] || set -- --messages 50000 --items 100
[ -x /usr/sbin/pgbouncer ] || { echo "needs Debian's pgbouncer (apt-get install pgbouncer)" >&2; exit 1; }
dir=$(mktemp -d)
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat > "$dir/pgbouncer.ini" <<INI
[databases]
* = host=127.0.0.1 port=5432
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = trust
auth_file = $dir/users.txt
pool_mode = transaction
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
ignore_startup_parameters = extra_float_digits,options
INI
echo '"postgres" ""' > "$dir/users.txt"
chown -R postgres:postgres "$dir"
cleanup() { kill "$(cat "$dir/pgbouncer.pid" 2>/dev/null)" 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
runuser -u postgres -- /usr/sbin/pgbouncer -d "$dir/pgbouncer.ini"

results=$(mktemp)
for round in $(seq 1 "$rounds"); do
  for side in direct pgbouncer; do
    # drain.sh makes a fresh database per run; the workers reach it through
    # PgBouncer with the same name, keeping no prepared statement (docs/deployment.md,
    # "PgBouncer").
    if [ "$side" = pgbouncer ]; then
      export WORKER_DATABASE_URL_TEMPLATE="postgres://postgres@127.0.0.1:$port/{db}?statement-cache-capacity=0"
    else
      unset WORKER_DATABASE_URL_TEMPLATE
    fi
    report=$(bench/drain.sh 1 "" "$@")
    echo "$report" | python3 -c "import json,sys; r=json.load(sys.stdin); print('$side', r['throughput_per_sec'], r['invariants_hold'], r['cpu_secs']['workers'] * 1e6 / r['messages'])" >> "$results"
    echo "round $round $side: $(echo "$report" | python3 bench/figure.py)"
  done
done
python3 - "$results" <<'PY'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
def med(side, col):
    return statistics.median(float(r[col]) for r in rows if r[0] == side)
assert all(r[2] == "True" for r in rows), "an invariant broke in some run"
d, p = med("direct", 1), med("pgbouncer", 1)
print(f"median drain: direct {d:.0f} msg/s, through PgBouncer {p:.0f} msg/s: {p / d:.2f}x")
print(f"median worker CPU per request: direct {med('direct', 3):.1f} µs, through PgBouncer {med('pgbouncer', 3):.1f} µs")
PY
