#!/usr/bin/env bash
# PostgreSQL's CPU per transaction at a fixed, low rate: one `qty_adjust` call
# carrying a single request (what the worker sends when requests arrive one at a
# time), as the worker sends it to PostgreSQL (a prepared statement) and behind
# PgBouncer (a simple query, `statement-cache-capacity=0`), against the honest
# per-message transaction of bench/pgbench.sh (ledger insert + guarded update +
# COMMIT, prepared). Each runs from 2 pgbench clients, in a database of their own
# that is dropped on exit. The CPU is summed over PostgreSQL's processes while
# the run is in its stride.
#
#   bench/pg_call_cost.sh [RATE] [ROUNDS]     (defaults 1000 and 2)
set -euo pipefail
cd "$(dirname "$0")/.."
rate=${1:-1000}
rounds=${2:-2}
db=qtyw_pgcall_$(date +%s%N)
trap 'psql -q -h 127.0.0.1 -U postgres -c "drop database if exists $db" postgres' EXIT
bench/item_db.sh "$db" 1000
source bench/cpu.sh
for round in $(seq 1 "$rounds"); do
  for run in qty_adjust_one:prepared qty_adjust_one:simple per_message:prepared; do
    script=${run%:*} mode=${run#*:}
    pgbench -h 127.0.0.1 -U postgres -n -M "$mode" -c 2 -j 1 -R "$rate" -T 7 -D items=1000 \
      -f "bench/$script.sql" "$db" > /dev/null &
    # Backends that exit take their CPU time with them: sample while they run.
    sleep 1.5
    before=$(database)
    sleep 4
    after=$(database)
    wait
    echo "round $round, $script ($mode): PostgreSQL $(( (after - before) * 1000000 / $(getconf CLK_TCK) / (rate * 4) )) µs CPU per transaction at $rate/s"
  done
done
