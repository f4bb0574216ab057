#!/usr/bin/env bash
# Creates database DB with the worker's schema and ITEMS items, ids md5(1..ITEMS),
# as the pgbench scripts in bench/ expect. Dropping it is the caller's job.
#
#   bench/item_db.sh DB ITEMS
set -euo pipefail
cd "$(dirname "$0")/.."
db=${1:?database name} items=${2:?number of items}
DATABASE_URL=postgres://postgres@127.0.0.1:5432/$db target/release/qty-worker migrate 2>/dev/null
psql -q -h 127.0.0.1 -U postgres -d "$db" -c \
  "insert into items (id, qty) select md5(n::text)::uuid, 1000000000 from generate_series(1, $items) n"
