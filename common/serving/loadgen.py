"""A closed-loop load generator: `concurrency` clients, each sending its next request when the last returns.

    result = run_load("http://127.0.0.1:8000/predict", uploads, concurrency=64, duration_s=10)
    print(result.summary())   # throughput, p50/p95/p99 latency, status counts

It is an async httpx client in the caller's process rather than a load-testing service (locust, k6): nothing
to install or start beside the server, the number of clients in flight is exact (each is one coroutine with
one connection), and the result comes back as data a test or a benchmark can check. A closed loop measures
what a fixed number of users experience: as the server slows down they send less, so throughput and latency
are read together (a p99 at a throughput), never one without the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

__all__ = ["LoadResult", "RequestRecord", "Upload", "generate_load", "run_load"]


@dataclass(frozen=True)
class Upload:
    """One file to POST as multipart form data."""

    data: bytes
    filename: str = "image.png"
    content_type: str = "image/png"


@dataclass(frozen=True)
class RequestRecord:
    """What one request got: which upload it sent, its HTTP status (0: no response), latency, JSON body."""

    index: int
    upload: int
    status: int
    latency_ms: float
    body: Any = None
    error: str | None = None


@dataclass
class LoadResult:
    """All requests of one run and the figures derived from them."""

    url: str
    concurrency: int
    duration_s: float
    records: list[RequestRecord] = field(default_factory=list)

    @property
    def status_counts(self) -> dict[int, int]:
        return dict(sorted(Counter(r.status for r in self.records).items()))

    @property
    def ok(self) -> list[RequestRecord]:
        return [r for r in self.records if r.status == 200]

    @property
    def throughput(self) -> float:
        """Successful requests per second of wall time."""
        return len(self.ok) / self.duration_s if self.duration_s > 0 else 0.0

    def latency_percentiles(self, qs: Sequence[float] = (50, 95, 99)) -> dict[str, float]:
        """Latency of the successful requests at each percentile, in ms ({"p50": ...})."""
        latencies = [r.latency_ms for r in self.ok]
        if not latencies:
            return {f"p{q:g}": float("nan") for q in qs}
        values = np.percentile(np.asarray(latencies), qs)
        return {f"p{q:g}": float(v) for q, v in zip(qs, values, strict=True)}

    def summary(self) -> dict[str, Any]:
        """A JSON-ready digest: counts, throughput, latency percentiles and mean."""
        latencies = [r.latency_ms for r in self.ok]
        return {
            "url": self.url,
            "concurrency": self.concurrency,
            "requests": len(self.records),
            "status_counts": {str(k): v for k, v in self.status_counts.items()},
            "duration_s": self.duration_s,
            "throughput_rps": self.throughput,
            "latency_ms": {
                **self.latency_percentiles(),
                "mean": float(np.mean(latencies)) if latencies else float("nan"),
                "max": float(np.max(latencies)) if latencies else float("nan"),
            },
        }


async def generate_load(
    url: str,
    uploads: Sequence[Upload],
    *,
    concurrency: int,
    n_requests: int | None = None,
    duration_s: float | None = None,
    field_name: str = "file",
    timeout_s: float = 60.0,
    keep_bodies: bool = True,
) -> LoadResult:
    """Send uploads (round robin) from `concurrency` concurrent clients until n_requests were sent or
    duration_s has passed (whichever is given; both: whichever comes first)."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if not uploads:
        raise ValueError("uploads is empty: give at least one file to send")
    if n_requests is None and duration_s is None:
        raise ValueError("give n_requests or duration_s, or both, to bound the run")
    result = LoadResult(url=url, concurrency=concurrency, duration_s=0.0)
    next_index = 0

    def claim() -> int | None:
        nonlocal next_index
        if n_requests is not None and next_index >= n_requests:
            return None
        if duration_s is not None and time.perf_counter() - start >= duration_s:
            return None
        next_index += 1
        return next_index - 1

    async def send_until_done(client: httpx.AsyncClient) -> None:
        while (index := claim()) is not None:
            which = index % len(uploads)
            upload = uploads[which]
            files = {field_name: (upload.filename, upload.data, upload.content_type)}
            sent = time.perf_counter()
            try:
                response = await client.post(url, files=files)
            except httpx.HTTPError as error:
                latency_ms = 1000 * (time.perf_counter() - sent)
                result.records.append(RequestRecord(index, which, 0, latency_ms, error=repr(error)))
                continue
            latency_ms = 1000 * (time.perf_counter() - sent)
            body = None
            if keep_bodies:
                try:
                    body = response.json()
                except ValueError:
                    body = response.text
            result.records.append(RequestRecord(index, which, response.status_code, latency_ms, body))

    # One client with one connection per coroutine: a shared pool of `concurrency` connections costs
    # httpcore time on every request (it scans the pool under a lock), which at 64 clients is load-generator
    # overhead that would be read as server latency. Clients are made before the clock starts.
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(httpx.AsyncClient(limits=limits, timeout=timeout_s))
            for _ in range(concurrency)
        ]
        start = time.perf_counter()
        await asyncio.gather(*(send_until_done(client) for client in clients))
        result.duration_s = time.perf_counter() - start
    result.records.sort(key=lambda r: r.index)
    return result


def run_load(url: str, uploads: Sequence[Upload], **kwargs: Any) -> LoadResult:
    """generate_load() from synchronous code (a test, a command): its own event loop, run to the end."""
    return asyncio.run(generate_load(url, uploads, **kwargs))
