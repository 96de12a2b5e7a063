"""Task batching: concurrent requests share forward passes (seen in the batch-size histogram the server
exports, read here), no batch exceeds --max-batch, and every answer belongs to its own request."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import reference
import served

from common.grading.client import Submission
from common.grading.source_scan import scan_source

REQUESTS = 16
MAX_BATCH = 8
# Long enough that 16 requests sent at once meet in the batcher even on a loaded machine; a full batch does
# not wait for it.
MAX_WAIT_MS = 1000
HISTOGRAM = "predict_batch_size"


def test_concurrent_requests_are_batched_and_answered_each_their_own(
    submission: Submission, model, known
) -> None:
    assert_batcher_written_here(submission.source("modelserver/batching.py"))
    model_file, centroids = model
    pngs = [png for png, _ in known[:REQUESTS]]  # distinct images: a swapped answer shows
    expected = reference.expected_probabilities(pngs, centroids)
    options = ("--max-batch", str(MAX_BATCH), "--max-wait-ms", str(MAX_WAIT_MS))
    with served.running(submission, model_file, *options) as server:
        before = server.metrics()
        with ThreadPoolExecutor(REQUESTS) as pool:
            responses = list(pool.map(server.predict, pngs))
        after = server.metrics()
    for i, (response, want) in enumerate(zip(responses, expected, strict=True)):
        assert response.status_code == 200, f"request {i} answered {response.status_code}"
        served.check_answer(response.json(), want, f"request {i} (of {REQUESTS} sent at once)")
    images = served.delta(before, after, f"{HISTOGRAM}_sum")
    batches = served.delta(before, after, f"{HISTOGRAM}_count")
    assert images == REQUESTS, (
        f"{HISTOGRAM}_sum rose by {images:g} for {REQUESTS} images, expected {REQUESTS}"
    )
    singles = served.delta(before, after, f"{HISTOGRAM}_bucket", le="1.0")
    assert singles < batches, (
        f"all {batches:g} forward passes for {REQUESTS} concurrent requests had one image"
    )
    within = served.delta(before, after, f"{HISTOGRAM}_bucket", le=f"{MAX_BATCH:.1f}")
    assert within == batches, (
        f"{batches - within:g} forward passes had more than --max-batch {MAX_BATCH} images"
    )


def assert_batcher_written_here(source: str) -> None:
    """The lesson is the batcher: one imported from the course library (week 7's) is not an answer."""
    imports = scan_source(source).imports
    borrowed = sorted(
        name for name in imports if name.startswith(("common", "week07_application_deployment"))
    )
    assert not borrowed, f"batching.py imports {borrowed}: write the batcher with asyncio"
