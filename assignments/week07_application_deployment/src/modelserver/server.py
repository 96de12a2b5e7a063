"""The server process, given by the course: your HTTP app and gRPC servicer over one batcher, on Unix sockets.

    python -m modelserver.server --model model.pt --http-socket /tmp/http.sock --grpc-socket /tmp/grpc.sock

Both front ends listen on Unix domain sockets, at paths the caller chooses: the grader starts this process in
a sandbox without any network, and a socket that is a file in a folder it shares with the sandbox is how it
reaches the service (`curl --unix-socket /tmp/http.sock http://localhost/health` does the same by hand).
The model loads, the batcher starts, then both front ends start accepting; on SIGTERM or SIGINT the HTTP
server stops accepting and finishes its requests, then gRPC, then the batcher.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

import grpc
import torch
import uvicorn

from modelserver.app import Metrics, Service, build_app
from modelserver.batching import Batcher
from modelserver.grpc_api import load_stubs
from modelserver.grpc_service import add_classifier_servicer
from modelserver.model import load_classifier

GRACE_S = 5.0  # for gRPC calls in flight at shutdown


async def serve(args: argparse.Namespace) -> None:
    """Run the service until SIGTERM or SIGINT."""
    torch.set_num_threads(1)  # the event loop needs a core too
    classifier = load_classifier(args.model)
    metrics = Metrics()
    batcher = Batcher(classifier.predict, args.max_batch, args.max_wait_ms, on_batch=metrics.observe_batch)
    service = Service(classifier, batcher, metrics, args.max_image_bytes)
    pb2, pb2_grpc = load_stubs(Path(tempfile.mkdtemp(prefix="stubs-")))
    grpc_server = grpc.aio.server(options=[("grpc.max_receive_message_length", 4 * args.max_image_bytes)])
    await add_classifier_servicer(grpc_server, service, pb2, pb2_grpc)
    grpc_server.add_insecure_port(f"unix:{args.grpc_socket}")
    http = uvicorn.Server(uvicorn.Config(build_app(service), uds=str(args.http_socket), log_level="warning"))
    await batcher.start()
    await grpc_server.start()
    await http.serve()  # returns after SIGTERM or SIGINT, once its requests are answered
    await grpc_server.stop(grace=GRACE_S)
    await batcher.stop()


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and serve."""
    parser = argparse.ArgumentParser(prog="python -m modelserver.server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--model", required=True, type=Path, help="a file written by model.save_classifier")
    parser.add_argument("--http-socket", required=True, type=Path, help="Unix socket path for HTTP")
    parser.add_argument("--grpc-socket", required=True, type=Path, help="Unix socket path for gRPC")
    parser.add_argument("--max-batch", type=int, default=16, help="1: no batching (the baseline)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--max-image-bytes", type=int, default=64 * 1024)
    asyncio.run(serve(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
