#!/usr/bin/env bash
# The per-message ceiling: what PostgreSQL does when every adjustment is its own
# transaction (ledger insert + guarded update + COMMIT), 16 clients, with the
# worker's schema and fsync/synchronous_commit as configured. Prints pgbench's tps.
#
#   bench/pgbench.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-20}
db=qtyw_pgbench
psql -q -h 127.0.0.1 -U postgres -c "drop database if exists $db" postgres
DATABASE_URL=postgres://postgres@127.0.0.1:5432/$db target/release/qty-worker migrate 2>/dev/null
psql -q -h 127.0.0.1 -U postgres -d $db -c \
  "insert into items (id, qty) select md5(n::text)::uuid, 1000000000 from generate_series(1, 100) n"
script=$(mktemp)
cat > "$script" <<'SQL'
\set item random(1, 100)
\set delta random(-3, 2)
begin;
insert into adjustments (message_id, item_id, delta, outcome, qty_after)
  values (gen_random_uuid()::text, md5(:item::text)::uuid, :delta, 'applied', 0);
update items set qty = qty + :delta where id = md5(:item::text)::uuid and qty + :delta >= 0;
commit;
SQL
pgbench -h 127.0.0.1 -U postgres -n -c 16 -j 2 -T "$seconds" -f "$script" $db | grep -E "^tps"
psql -q -h 127.0.0.1 -U postgres -c "drop database $db" postgres
