#!/usr/bin/env bash
# The per-message ceiling: what PostgreSQL does when every adjustment is its own
# transaction, the best way a one-message-at-a-time worker could write it: the
# ledger insert `on conflict do nothing` plus the guarded update plus COMMIT, as
# prepared statements (`-M prepared`), 16 clients on 2 pgbench threads, over
# 1,000 items (so clients rarely queue on one row), with the worker's schema and
# fsync/synchronous_commit as configured. Prints pgbench's tps.
#
#   bench/pgbench.sh [SECONDS] [ITEMS]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-20}
items=${2:-1000}
db=qtyw_pgbench_$(date +%s%N)
script=$(mktemp)
trap 'rm -f "$script"; psql -q -h 127.0.0.1 -U postgres -c "drop database if exists $db" postgres' EXIT
DATABASE_URL=postgres://postgres@127.0.0.1:5432/$db target/release/qty-worker migrate 2>/dev/null
psql -q -h 127.0.0.1 -U postgres -d "$db" -c \
  "insert into items (id, qty) select md5(n::text)::uuid, 1000000000 from generate_series(1, $items) n"
cat > "$script" <<SQL
\set item random(1, $items)
\set delta random(-3, 2)
begin;
insert into adjustments (message_id, item_id, delta, outcome, qty_after)
  values (gen_random_uuid()::text, md5(:item::text)::uuid, :delta, 'applied', 0)
  on conflict do nothing;
update items set qty = qty + :delta where id = md5(:item::text)::uuid and qty + :delta >= 0;
commit;
SQL
pgbench -h 127.0.0.1 -U postgres -n -M prepared -c 16 -j 2 -T "$seconds" -f "$script" "$db" | grep -E "^tps"
