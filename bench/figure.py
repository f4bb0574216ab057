"""Formats one `qty-worker bench --json` report (from stdin) as a line."""
import json
import sys


def cpu_per_message(r):
    """CPU microseconds per request, by process, when the run measured them."""
    cpu = r.get("cpu_secs")
    if not cpu:
        return ""
    n = r["messages"]
    parts = ", ".join(f"{name} {secs * 1e6 / n:.0f}" for name, secs in cpu.items())
    switches = r.get("worker_context_switches")
    per = f"; worker context switches/request {switches / n:.2f}" if switches is not None else ""
    return f"; CPU µs/request: {parts}{per}"


r = json.load(sys.stdin)
invariants = "hold" if r["invariants_hold"] else "BROKEN"
print(f'{r["throughput_per_sec"]:.0f} msg/s, peak RSS {r.get("worker_peak_rss_mib", "-")} MiB, '
      f'p50 {r["latency_ms"]["p50"]:.1f} ms, p99 {r["latency_ms"]["p99"]:.1f} ms, invariants {invariants}'
      + cpu_per_message(r))
