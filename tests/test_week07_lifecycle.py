"""Week 7's server lifecycle: graceful shutdown answers the requests in flight; a taken port is a clear error."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time

import httpx
import pytest

from common.serving.loadgen import LoadResult, Upload, run_load
from week07_application_deployment.images import example_images
from week07_application_deployment.process import ServerDidNotStartError, ServerProcess
from week07_application_deployment.serve import bind_socket

IN_FLIGHT = 6


def queue_depth(server: ServerProcess) -> float:
    for line in httpx.get(f"{server.http_url}/metrics").text.splitlines():
        if line.startswith("classifier_queue_depth "):
            return float(line.split()[1])
    raise AssertionError("no classifier_queue_depth in /metrics")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_finishes_in_flight_requests_then_exits(week07_model, sig: signal.Signals) -> None:
    # A long max wait holds the requests in the batcher, so they are surely in flight when SIGTERM comes.
    with ServerProcess.start(week07_model, grpc_port=None, max_batch=64, max_wait_ms=3000) as server:
        uploads = [Upload(png) for png, _ in example_images(IN_FLIGHT, num_classes=4, size=32, seed=1)]
        results: list[LoadResult] = []
        url = f"{server.http_url}/predict"
        client = threading.Thread(
            target=lambda: results.append(run_load(url, uploads, concurrency=IN_FLIGHT, n_requests=IN_FLIGHT))
        )
        client.start()
        deadline = time.monotonic() + 120  # generous: CI machines are shared
        while queue_depth(server) < IN_FLIGHT:
            assert time.monotonic() < deadline, (
                f"the requests never queued; server output:\n{server.output()}"
            )
            time.sleep(0.02)
        code = server.stop(grace_s=60, sig=sig)  # while all of them wait in the batcher
        client.join(60)
        assert code == 0, server.output()
        assert "shutting down" in server.output() and "stopped" in server.output()
        assert results and results[0].status_counts == {200: IN_FLIGHT}
        assert all(record.body["label"].startswith("angle-") for record in results[0].records)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.http_url}/health")


def test_a_port_in_use_is_a_clear_error(week07_model) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServerDidNotStartError) as error:
            ServerProcess.start(week07_model, http_port=port, grpc_port=None)
    message = str(error.value)
    assert "exited with code 2" in message
    assert f"HTTP port {port} on 127.0.0.1 is already in use" in message and "--http-port" in message


def test_connections_to_the_listening_socket_send_without_nagle_delay() -> None:
    """asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets made with proto IPPROTO_TCP. With it
    on, a response's body waits for the client's acknowledgement of its headers, up to 40 ms per answer."""

    async def nodelay_of_an_accepted_connection() -> int:
        accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connect, sock=bind_socket("127.0.0.1", 0, "HTTP"))
        async with server:
            _, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
            value = await asyncio.wait_for(accepted, 30)
            writer.close()
        return value

    assert asyncio.run(nodelay_of_an_accepted_connection()) != 0
