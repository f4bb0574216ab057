#!/usr/bin/env bash
# PostgreSQL's CPU per transaction at a fixed, low rate: one `qty_adjust` call
# carrying a single request (what the worker sends when requests arrive one at a
# time) against the honest per-message transaction of bench/pgbench.sh (ledger
# insert + guarded update + COMMIT). Both run as prepared statements from 2
# pgbench clients, in a database of their own that is dropped on exit. The CPU is
# summed over PostgreSQL's processes while the run is in its stride.
#
#   bench/pg_call_cost.sh [RATE] [ROUNDS]     (defaults 1000 and 2)
set -euo pipefail
cd "$(dirname "$0")/.."
rate=${1:-1000}
rounds=${2:-2}
db=qtyw_pgcall_$(date +%s%N)
dir=$(mktemp -d)
trap 'rm -rf "$dir"; psql -q -h 127.0.0.1 -U postgres -c "drop database if exists $db" postgres' EXIT
DATABASE_URL=postgres://postgres@127.0.0.1:5432/$db target/release/qty-worker migrate 2>/dev/null
psql -q -h 127.0.0.1 -U postgres -d "$db" -c \
  "insert into items (id, qty) select md5(n::text)::uuid, 1000000000 from generate_series(1, 1000) n"
cat > "$dir/qty_adjust.sql" <<'SQL'
\set item random(1, 1000)
\set delta random(-3, 2)
select * from qty_adjust(array[gen_random_uuid()::text], array[md5(:item::text)::uuid], array[:delta::bigint], 200);
SQL
cat > "$dir/per_message.sql" <<'SQL'
\set item random(1, 1000)
\set delta random(-3, 2)
begin;
insert into adjustments (message_id, item_id, delta, outcome, qty_after)
  values (gen_random_uuid()::text, md5(:item::text)::uuid, :delta, 'applied', 0)
  on conflict do nothing;
update items set qty = qty + :delta where id = md5(:item::text)::uuid and qty + :delta >= 0;
commit;
SQL
ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
database() { local sum=0; for pid in $(pgrep -u postgres); do sum=$((sum + $(ticks "$pid"))); done; echo $sum; }
for round in $(seq 1 "$rounds"); do
  for script in qty_adjust per_message; do
    pgbench -h 127.0.0.1 -U postgres -n -M prepared -c 2 -j 1 -R "$rate" -T 7 -f "$dir/$script.sql" "$db" > /dev/null &
    # Backends that exit take their CPU time with them: sample while they run.
    sleep 1.5
    before=$(database)
    sleep 4
    after=$(database)
    wait
    echo "round $round, $script: PostgreSQL $(( (after - before) * 1000000 / $(getconf CLK_TCK) / (rate * 4) )) µs CPU per transaction at $rate/s"
  done
done
