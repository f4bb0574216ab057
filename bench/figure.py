"""Formats one `qty-worker bench --json` report (from stdin) as a line."""
import json
import sys

r = json.load(sys.stdin)
invariants = "hold" if r["invariants_hold"] else "BROKEN"
print(f'{r["throughput_per_sec"]:.0f} msg/s, peak RSS {r.get("worker_peak_rss_mib", "-")} MiB, '
      f'p50 {r["latency_ms"]["p50"]:.1f} ms, p99 {r["latency_ms"]["p99"]:.1f} ms, invariants {invariants}')
