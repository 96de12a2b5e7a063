"""Week 7 without a server: the dynamic batcher, image decoding limits, the gRPC stubs, the load generator's
figures and the benchmark's command line."""

from __future__ import annotations

import asyncio
import struct
import zlib

import pytest

from common import cli
from common.serving.batcher import BatcherNotRunningError, BatchingConfig, DynamicBatcher, QueueFullError
from common.serving.loadgen import LoadResult, RequestRecord
from week07_application_deployment.images import ImageRejected, decode_image, example_images


def run(coroutine):
    return asyncio.run(coroutine)


async def _batched(
    config: BatchingConfig, items: list[int], fail: bool = False
) -> tuple[list, list[list[int]]]:
    """Submit all items at once; return each caller's result (or exception) and the batches that ran."""
    batches: list[list[int]] = []

    def run_batch(inputs: list[int]) -> list[int]:
        batches.append(list(inputs))
        if fail:
            raise RuntimeError("model exploded")
        return [10 * x for x in inputs]

    batcher = DynamicBatcher(run_batch, config)
    await batcher.start()
    results = await asyncio.gather(*(batcher.submit(x) for x in items), return_exceptions=True)
    await batcher.stop()
    return results, batches


def test_concurrent_requests_are_grouped_up_to_max_batch_and_routed_back() -> None:
    results, batches = run(_batched(BatchingConfig(max_batch_size=4, max_wait_ms=50), list(range(10))))
    assert results == [10 * x for x in range(10)]  # each caller gets the output of its own input
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(x for b in batches for x in b) == list(range(10))


def test_batch_size_one_is_the_unbatched_baseline() -> None:
    results, batches = run(_batched(BatchingConfig(max_batch_size=1, max_wait_ms=50), list(range(5))))
    assert results == [0, 10, 20, 30, 40] and [len(b) for b in batches] == [1] * 5


def test_a_lone_request_runs_after_max_wait_and_a_failed_batch_fails_each_caller() -> None:
    results, batches = run(_batched(BatchingConfig(max_batch_size=8, max_wait_ms=20), [7]))
    assert results == [70] and batches == [[7]]
    results, _ = run(_batched(BatchingConfig(max_batch_size=8, max_wait_ms=1), [1, 2, 3], fail=True))
    assert all(isinstance(r, RuntimeError) and "model exploded" in str(r) for r in results)


def test_one_output_per_input_is_enforced() -> None:
    async def main() -> Exception:
        batcher = DynamicBatcher(lambda inputs: [0], BatchingConfig(max_batch_size=4, max_wait_ms=20))
        await batcher.start()
        results = await asyncio.gather(*(batcher.submit(x) for x in range(3)), return_exceptions=True)
        await batcher.stop()
        return results[0]

    error = run(main())
    assert isinstance(error, RuntimeError) and "1 outputs for 3 inputs" in str(error)


def test_stop_answers_what_is_queued_then_refuses_new_work() -> None:
    async def main() -> tuple[list[int], BaseException | None]:
        batcher = DynamicBatcher(
            lambda xs: [x + 1 for x in xs], BatchingConfig(max_batch_size=2, max_wait_ms=500)
        )
        await batcher.start()
        pending = [asyncio.ensure_future(batcher.submit(x)) for x in range(5)]
        await asyncio.sleep(0)  # let them queue
        await batcher.stop()  # does not wait the 500 ms per batch: the stop marker ends the last wait
        answered = [await p for p in pending]
        try:
            await batcher.submit(9)
        except BatcherNotRunningError as error:
            return answered, error
        return answered, None

    answered, error = run(main())
    assert answered == [1, 2, 3, 4, 5]
    assert error is not None and "not running" in str(error)


def test_a_full_queue_refuses_with_a_clear_error() -> None:
    async def main() -> list:
        batcher = DynamicBatcher(lambda xs: xs, BatchingConfig(max_batch_size=1, max_wait_ms=0, max_queue=2))
        await batcher.start()
        results = await asyncio.gather(*(batcher.submit(x) for x in range(4)), return_exceptions=True)
        await batcher.stop()
        return results

    results = run(main())
    assert results[:2] == [0, 1]
    assert all(isinstance(r, QueueFullError) and "max_queue=2" in str(r) for r in results[2:])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_batch_size": 0}, "max_batch_size must be >= 1"),
        ({"max_wait_ms": -1}, "max_wait_ms must be >= 0"),
    ],
)
def test_batching_config_says_what_is_wrong(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BatchingConfig(**kwargs)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels, without their data: what a decompression bomb
    looks like before it is decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decoding_checks_pixels_before_decoding_and_resizes() -> None:
    with pytest.raises(ImageRejected) as error:
        decode_image(_png_header_only(3000, 3000), size=32, max_pixels=1_000_000)
    assert error.value.status == 413 and "3000x3000 = 9,000,000 pixels" in error.value.message
    with pytest.raises(ImageRejected) as error:
        decode_image(b"GIF89a, but not really", size=32, max_pixels=1_000_000)
    assert error.value.status == 422 and "not an image" in error.value.message
    png, _ = example_images(1, num_classes=4, size=48, seed=3)[0]
    pixels = decode_image(png, size=32, max_pixels=1_000_000)
    assert pixels.shape == (3, 32, 32) and str(pixels.dtype) == "torch.uint8"


def test_grpc_stubs_are_generated_from_the_proto() -> None:
    from week07_application_deployment.grpc_stubs import PROTO, SERVICE_NAME, load_stubs

    pb2, pb2_grpc = load_stubs()
    service = pb2.DESCRIPTOR.services_by_name["Classifier"]
    assert service.full_name == SERVICE_NAME and service.full_name.split(".")[-1] in PROTO.read_text()
    assert {m.name for m in service.methods} == {"Predict"}
    assert [f.name for f in pb2.PredictRequest.DESCRIPTOR.fields] == ["image"]
    assert [f.name for f in pb2.PredictReply.DESCRIPTOR.fields] == ["label", "probabilities"]
    assert hasattr(pb2_grpc, "ClassifierStub")


def test_load_result_figures() -> None:
    records = [RequestRecord(i, 0, 200, float(i + 1)) for i in range(100)] + [RequestRecord(100, 0, 422, 1.0)]
    result = LoadResult(url="u", concurrency=4, duration_s=2.0, records=records)
    assert result.status_counts == {200: 100, 422: 1}
    assert result.throughput == 50.0  # successful requests only
    p = result.latency_percentiles()
    assert p["p50"] == pytest.approx(50.5) and p["p99"] == pytest.approx(99.01)


def test_bench_serving_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "serving", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "dynamic batching" in out and "effdl bench serving --quick" in out
