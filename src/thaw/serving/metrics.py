"""Request counts, errors and latency percentiles, as /metrics reports them.

Latencies are kept for the most recent `window` requests of each route, so memory stays bounded
however long the server runs, and p50/p99 describe the present load rather than all of history.

Each process counts its own: with `workers > 1`, an answer is the answering worker's, named by
its pid (a `pid` field; a `pid` label on every Prometheus sample, so a scraper keeps one series
per worker and sums them).
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict, deque
from collections.abc import Mapping
from typing import Any

import numpy as np


class RequestMetrics:
    def __init__(self, window: int = 10_000) -> None:
        self.counts: Counter[tuple[str, int]] = Counter()  # (route, status) -> requests
        self.latencies: defaultdict[str, deque[float]] = defaultdict(lambda: deque(maxlen=window))

    def record(self, route: str, status: int, seconds: float) -> None:
        self.counts[route, status] += 1
        self.latencies[route].append(seconds)

    def summary(self, batch_sizes: Mapping[int, int], now: Mapping[str, int]) -> dict[str, Any]:
        """Per route: requests by status and latency p50/p99 in ms; errors (status >= 400) in
        all; the batches the model ran, by size; and the gauges in `now` (what is waiting)."""
        routes: dict[str, Any] = {}
        for (route, status), count in sorted(self.counts.items()):
            routes.setdefault(route, {"requests": {}})["requests"][str(status)] = count
        for route, seconds in self.latencies.items():
            p50, p99 = np.percentile(np.fromiter(seconds, float), [50, 99]) * 1000
            routes[route]["latency_ms"] = {"p50": round(p50, 3), "p99": round(p99, 3)}
        batches = sum(batch_sizes.values())
        images = sum(size * count for size, count in batch_sizes.items())
        return {
            "pid": os.getpid(),
            "requests": sum(self.counts.values()),
            "errors": sum(n for (_, status), n in self.counts.items() if status >= 400),
            "routes": routes,
            "batches": {
                "count": batches,
                "images": images,
                "mean_size": round(images / batches, 3) if batches else None,
                "by_size": {str(size): batch_sizes[size] for size in sorted(batch_sizes)},
            },
            "now": dict(now),
        }

    def prometheus(self, batch_sizes: Mapping[int, int], now: Mapping[str, int]) -> str:
        """The same figures in Prometheus' text exposition format."""
        pid = f'pid="{os.getpid()}"'
        lines = ["# TYPE thaw_requests_total counter"]
        for (route, status), count in sorted(self.counts.items()):
            lines.append(f'thaw_requests_total{{{pid},route="{route}",status="{status}"}} {count}')
        lines.append("# TYPE thaw_request_latency_seconds summary")
        for route, seconds in sorted(self.latencies.items()):
            p50, p99 = np.percentile(np.fromiter(seconds, float), [50, 99])
            for quantile, value in (("0.5", p50), ("0.99", p99)):
                lines.append(
                    f'thaw_request_latency_seconds{{{pid},route="{route}",quantile="{quantile}"}} '
                    f"{value:.6f}"
                )
        lines.append("# TYPE thaw_batches_total counter")
        for size in sorted(batch_sizes):
            lines.append(f'thaw_batches_total{{{pid},size="{size}"}} {batch_sizes[size]}')
        for name, value in now.items():
            lines += [f"# TYPE thaw_{name} gauge", f"thaw_{name}{{{pid}}} {value}"]
        return "\n".join(lines) + "\n"
