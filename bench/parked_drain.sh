#!/usr/bin/env bash
# How fast requests parked for a locked item drain once the lock goes, beside
# the same requests for an item nobody locks, in one run.
#
# Each round publishes N requests for one item as a backlog (`qty-worker bench
# --backlog --items 1`). Parked: an operator's transaction locks the item, the
# worker starts and parks every request (the first after its lock wait, the rest
# behind it), the transaction ends, and the bench times the replies from the
# first to the last: every one of them comes from the judge. It also prints the
# time from the lock's end to the bench's exit, which bounds the time to the
# last reply, the judge's wait to notice included. Free: the same backlog with
# nothing locked, answered by the lanes as usual.
#
#   bench/parked_drain.sh [ROUNDS] [N]     (defaults 3 and 1500)
# QTY_BIN picks the worker binary (default target/release/qty-worker).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
n=${2:-1500}
bin=${QTY_BIN:-target/release/qty-worker}
source bench/cpu.sh
out=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]:-}"; do [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$out"
}
trap cleanup EXIT

sql() { psql -qAt -h 127.0.0.1 -U postgres -d "$db" -c "$1"; }

# One drain; "parked" or "free". Prints the bench's JSON report.
drain() {
  local how=$1 suffix
  suffix=$(date +%s%N)
  db=qtyw_parked_$suffix
  export DATABASE_URL=postgres://postgres@127.0.0.1:5432/$db
  export QTY_EXCHANGE=bench-parked-$suffix QTY_QUEUE=bench-parked-$suffix.adjust QTY_LOG_FORMAT=json
  "$bin" migrate 2> "$out/migrate.log" || { cat "$out/migrate.log" >&2; exit 1; }
  mkfifo "$out/bench.err"
  "$bin" bench --backlog --json --messages "$n" --items 1 > "$out/report.json" 2> "$out/bench.err" &
  local bench=$!
  pids+=($bench)
  while IFS= read -r line; do case "$line" in *"backlog published"*) break ;; esac; done < "$out/bench.err"
  cat "$out/bench.err" > /dev/null &
  if [ "$how" = parked ]; then
    # The operator's transaction: holds the row until told to end.
    mkfifo "$out/lock.sql"
    psql -qAt -h 127.0.0.1 -U postgres -d "$db" < "$out/lock.sql" > /dev/null &
    local holder=$!
    exec 7> "$out/lock.sql"
    echo "begin; select 1 from items for update;" >&7
    until [ "$(sql "select count(*) from pg_locks l join pg_class c on c.oid = l.relation where c.relname = 'items' and l.mode = 'RowShareLock'")" -gt 0 ]; do sleep 0.05; done
  fi
  # Without the lock's pipe: psql must see it close.
  "$bin" run --http-addr 127.0.0.1:0 --queue "$QTY_QUEUE" 2> "$out/worker.log" 7>&- &
  local worker=$!
  pids+=($worker)
  if [ "$how" = parked ]; then
    until [ "$(sql "select count(*) from parked")" -ge "$n" ]; do sleep 0.05; done
    local w0 d0
    w0=$(ticks "$worker") d0=$(database)
    released=$(date +%s%N)
    printf 'rollback;\n\\q\n' >&7
    exec 7>&-
    wait "$holder"
    rm -f "$out/lock.sql"
  else
    w0=$(ticks "$worker") d0=$(database)
    released=""
  fi
  wait "$bench"
  local since=""
  [ -z "$released" ] || since=$(( ($(date +%s%N) - released) / 1000000 ))
  local w1 d1
  w1=$(ticks "$worker") d1=$(database)
  kill -TERM "$worker"; wait "$worker" || true
  python3 - "$out/report.json" "$how" "$(per_request $((w1 - w0)) "$n")" "$(per_request $((d1 - d0)) "$n")" "$since" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
ok = r["invariants_hold"] and r["replies"] == r["messages"]
since = f", lock released to last reply ≤ {int(sys.argv[5]) / 1000:.3f} s ({r['messages'] / (int(sys.argv[5]) / 1000):.0f}/s)" if sys.argv[5] else ""
print(f"{sys.argv[2]:>6}: {r['throughput_per_sec']:7.0f} replies/s first to last reply ({r['seconds']:.3f} s){since}; "
      f"CPU µs/request worker {sys.argv[3]}, database {sys.argv[4]}; {'invariants hold' if ok else 'INVARIANTS BROKEN'}")
PY
  rm -f "$out/bench.err"
  psql -q -h 127.0.0.1 -U postgres -c "drop database if exists $db with (force)" postgres
  bench/forget-names.sh "$QTY_EXCHANGE" "$QTY_QUEUE"
}

echo "date: $(date -u +%FT%TZ), $(nproc) cores, $($bin --version), $n requests for one item"
for round in $(seq 1 "$rounds"); do
  echo "round $round"
  drain parked
  drain free
done
