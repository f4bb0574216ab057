#!/usr/bin/env bash
# The per-message ceiling: what PostgreSQL does when every adjustment is its own
# transaction, the best way a one-message-at-a-time worker could write it: the
# ledger insert `on conflict do nothing` plus the guarded update plus COMMIT, as
# prepared statements (`-M prepared`), 16 clients on 2 pgbench threads, over
# 1,000 items (so clients rarely queue on one row), with the worker's schema and
# fsync/synchronous_commit as configured (bench/per_message.sql). Prints
# pgbench's tps.
#
#   bench/pgbench.sh [SECONDS] [ITEMS]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-20}
items=${2:-1000}
db=qtyw_pgbench_$(date +%s%N)
trap 'psql -q -h 127.0.0.1 -U postgres -c "drop database if exists $db" postgres' EXIT
bench/item_db.sh "$db" "$items"
pgbench -h 127.0.0.1 -U postgres -n -M prepared -c 16 -j 2 -T "$seconds" -D items="$items" \
  -f bench/per_message.sql "$db" | grep -E "^tps"
