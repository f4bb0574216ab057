#!/usr/bin/env bash
# A/B: alternate backlog drains between two worker binaries in one session, so
# both see the same machine, and print each run plus the ratio of the medians:
# of the throughput, and of the worker's CPU per request (the steadier figure on
# a shared machine).
#
#   bench/compare.sh BASELINE_BIN CANDIDATE_BIN [ROUNDS] [BENCH FLAGS…]
#   bench/compare.sh /tmp/qty-worker-before target/release/qty-worker 3 --messages 50000
#
# CAND_WORKER_FLAGS and CAND_BENCH_FLAGS add flags to the candidate's runs only,
# e.g. CAND_WORKER_FLAGS="--publishers guest" CAND_BENCH_FLAGS="--user-id guest".
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:?baseline binary} cand=${2:?candidate binary} rounds=${3:-3}
shift 3 || shift $#
[ $# -gt 0 ] || set -- --messages 50000 --items 100
results=$(mktemp)
for round in $(seq 1 "$rounds"); do
  for side in base cand; do
    bin=$base; [ "$side" = cand ] && bin=$cand
    # Each side migrates its own database with its own binary.
    if [ "$side" = cand ]; then
      # shellcheck disable=SC2086
      report=$(QTY_BIN=$bin bench/drain.sh 1 "${CAND_WORKER_FLAGS:-}" "$@" ${CAND_BENCH_FLAGS:-})
    else
      report=$(QTY_BIN=$bin bench/drain.sh 1 "" "$@")
    fi
    echo "$report" | python3 -c "import json,sys; r=json.load(sys.stdin); print('$side', r['throughput_per_sec'], r['invariants_hold'], r['cpu_secs']['workers'] * 1e6 / r['messages'])" >> "$results"
    echo "round $round $side: $(echo "$report" | python3 bench/figure.py)"
  done
done
python3 - "$results" <<'PY'
import statistics, sys
runs = {"base": [], "cand": []}
cpu = {"base": [], "cand": []}
for line in open(sys.argv[1]):
    side, rate, ok, us = line.split()
    assert ok == "True", "invariants broken"
    runs[side].append(float(rate))
    cpu[side].append(float(us))
b, c = statistics.median(runs["base"]), statistics.median(runs["cand"])
print(f"median baseline {b:.0f} msg/s, candidate {c:.0f} msg/s, candidate/baseline {c / b:.2f}")
b, c = statistics.median(cpu["base"]), statistics.median(cpu["cand"])
print(f"median worker CPU per request: baseline {b:.1f} µs, candidate {c:.1f} µs, candidate/baseline {c / b:.2f}")
PY
