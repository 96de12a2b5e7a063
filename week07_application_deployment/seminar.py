# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: -jupytext.text_representation
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Week 7 seminar: deploying a model
#
# A trained model becomes a product when something receives requests, runs the model on them, answers, says
# how it is doing and stops without dropping work. This week's service (`serve.py` beside this notebook) does
# that for a small image classifier. This seminar takes it apart and measures each piece:
#
# 1. **App servers and web servers**: what uvicorn does, what FastAPI does, and what sits in front of both.
# 2. **Sync and async handlers**: a handler that blocks against one that awaits, under concurrent clients.
# 3. **The GIL**: threads against processes for CPU-bound Python, and why the model can still run in a thread.
# 4. **Workers and processes**: what `uvicorn --workers N` would do to a model held in memory.
# 5. **Dynamic batching**: the real service at batch size 1 against batching, under 1 to 64 clients:
#    throughput against p99 latency, and where batching stops paying.
# 6. **gRPC and HTTP**: the same service, the same images, over both.
# 7. **Metrics and alerting**: a p99 computed from the `/metrics` histogram the way Prometheus does, against
#    the p99 the clients measured, and the alert rule built on it.
# 8. **Containers**: what the service's image must hold, and why.
#
# Everything runs on a CPU, on purpose: the service runs its model with one torch thread per process, so
# what is measured is the serving stack, not a GPU. Servers are real processes started by
# `week07_application_deployment.process` on ports the OS picks, and are stopped at the end of each cell.
# The committed notebook holds a full run on a shared 2-core CPU (its metadata says so); the load generator
# runs in this notebook's process and shares those two cores with the server. Cells that state a fact check
# it with `assert`. Timings on a shared CPU move from run to run, so the asserts check ratios with a margin,
# and a few that need the full-size model are checked in the full run only (the cell says which).

# %% tags=["parameters"]
import os

import torch

# SMALL: a small model and a few requests per measurement (a laptop, CI); full: the benchmark's wide model
# (width 4096, 3 blocks) and seconds of load per point. `effdl seminar --small/--full` and CI set EFFDL_SMALL.
# The service runs on a CPU by design, so its full size is a CPU run too.
SMALL = os.environ.get("EFFDL_SMALL", "1") == "1"
DEVICE = "cpu"  # the service's model runs on the CPU, one torch thread per server process

# %%
import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import matplotlib.pyplot as plt
import numpy as np
import psutil
import uvicorn
import yaml
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from common.bench import bench
from common.environment import environment
from common.serving.loadgen import LoadResult, Upload, run_load
from common.tables import show_table
from common.weeks import REPO_ROOT
from week07_application_deployment.benchmark import BENCH_MODEL, batch_size_histogram
from week07_application_deployment.classifier import load_classifier
from week07_application_deployment.cpu_work import busy_loop, busy_loop_expected
from week07_application_deployment.grpc_stubs import load_stubs
from week07_application_deployment.images import decode_image, example_images
from week07_application_deployment.process import ServerProcess
from week07_application_deployment.serve import bind_socket
from week07_application_deployment.train import HELD_OUT_SEED, TrainConfig, export, train

CORES = os.cpu_count() or 1
MB = 1e6
RESULTS: dict[str, str] = {}  # one line per key result; the summary cell at the end prints them
# Exported models go to build/ (ignored by git), printed relative to the repository.
WORK = REPO_ROOT / "build" / "week07_application_deployment"
WORK.mkdir(parents=True, exist_ok=True)


def in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs) in a thread of its own. Jupyter runs its own event loop in this thread, so code that
    calls asyncio.run() (the load generator, the async clients below) must run elsewhere."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def trained(name: str, config: TrainConfig) -> Path:
    """Train and export a classifier to build/; print what it is."""
    model, stats = train(config)
    path = export(model, config, WORK / f"{name}.pt2", stats)
    print(
        f"{name}: width {config.width}, {config.depth} blocks, {path.stat().st_size / MB:.1f} MB, held-out "
        f"accuracy {stats['held_out_accuracy']:.3f}, trained in {stats['train_s']:.1f} s"
    )
    return path


@contextlib.contextmanager
def servers_started(**specs: tuple[Path, dict[str, Any]]) -> Iterator[dict[str, ServerProcess]]:
    """Start several servers (name=(model, flags)) at once, since a start is mostly imports that can overlap;
    stop every one that started when the block ends, or when another failed to start. The generous timeout is
    for a shared machine, where importing torch in three processes at once can take minutes."""
    with contextlib.ExitStack() as stack:
        with ThreadPoolExecutor(len(specs)) as pool:
            futures = {
                name: pool.submit(ServerProcess.start, model, timeout_s=600, **flags)
                for name, (model, flags) in specs.items()
            }
        for future in futures.values():
            if future.exception() is None:
                stack.enter_context(future.result())
        for future in futures.values():
            if future.exception() is not None:
                raise future.exception()
        yield {name: future.result() for name, future in futures.items()}


# TINY: a forward pass far cheaper than a request's HTTP work. WIDE: the benchmark's model, whose forward pass
# dominates a request (small mode: a narrower one, so that CI stays quick).
TINY = TrainConfig(channels=8, width=32, steps=40)
WIDE = TrainConfig(width=1024, depth=2, steps=20) if SMALL else TrainConfig(**BENCH_MODEL)
tiny_model, wide_model = trained("tiny", TINY), trained("wide", WIDE)
held_out = example_images(
    64, num_classes=4, size=32, seed=HELD_OUT_SEED
)  # (PNG bytes, label): never trained on
uploads = [Upload(png) for png, _ in held_out]
print(
    f"sizes: {'small' if SMALL else 'full'}; CPU: {environment('cpu')['cpu']}, {CORES} cores, load average "
    f"{os.getloadavg()[0]:.1f}; torch {torch.__version__}, uvicorn {uvicorn.__version__}, grpcio {grpc.__version__}"
)

# %% [markdown]
# ## 1. App servers and web servers
#
# A Python web service is two programs that meet at one interface, **ASGI**: an *application* is an async
# function `app(scope, receive, send)`; a *server* calls it once per request. FastAPI builds the application:
# it routes a path to a handler, turns path and query strings into typed arguments (and refuses those that do
# not parse), calls the handler and serialises what it returns to JSON. It never touches a socket. To see
# that, call a FastAPI app by hand, the way a server would, with a `scope` (what was asked), a `receive()`
# (the request body) and a `send()` (where the response goes):

# %%
hello = FastAPI()


@hello.get("/hello/{name}")
async def say_hello(name: str, times: int = 1) -> dict[str, str]:
    return {"greeting": ", ".join([f"hello {name}"] * times)}


async def call_asgi(app: Any, path: str, query: bytes = b"") -> list[dict[str, Any]]:
    """Call an ASGI app directly, as a server does for one GET request; return the messages it sends."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": query, "root_path": "", "headers": [],
        "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 12345),
    }  # fmt: skip
    await app(scope, receive, send)
    return sent


direct = in_thread(asyncio.run, call_asgi(hello, "/hello/class", b"times=2"))
for message in direct:
    print(message)
refused = in_thread(asyncio.run, call_asgi(hello, "/hello/class", b"times=two"))
print("times=two ->", refused[0]["status"], refused[1]["body"].decode()[:110], "...")
assert direct[0]["status"] == 200 and direct[1]["body"] == b'{"greeting":"hello class, hello class"}'
assert refused[0]["status"] == 422, "FastAPI refuses a query argument that is not an int, before the handler"

# %% [markdown]
# **uvicorn** is the server: it opens the listening socket, accepts connections, reads bytes, parses them
# as HTTP (keep-alive, chunked bodies, malformed requests), builds the `scope`, runs the event loop on which
# every request's coroutine runs, and writes the response back as bytes. Below it serves the same app on a
# free port, in a thread of this notebook, and we speak raw HTTP to it over a socket: the body that comes
# back is the one the app produced above, now with the status line and headers uvicorn wrote.


# %%
@contextlib.contextmanager
def uvicorn_in_thread(app: Any) -> Iterator[str]:
    """Serve `app` with uvicorn on a free loopback port in a background thread; yield its base URL."""
    sock = bind_socket("127.0.0.1", 0, "HTTP")  # port 0: the OS picks a free one
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("uvicorn stopped before it started serving")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join()
        sock.close()


with uvicorn_in_thread(hello) as url:
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall(
            b"GET /hello/class?times=2 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        raw = b"".join(iter(lambda: connection.recv(4096), b""))
print(raw.decode())
head, body = raw.split(b"\r\n\r\n", 1)
assert head.startswith(b"HTTP/1.1 200 OK") and body == direct[1]["body"], "uvicorn wrote what the app sent"

# %% [markdown]
# A **web server** or reverse proxy (nginx, Envoy, a cloud load balancer) usually sits in front of the app
# server, and does what no Python process should: terminate TLS, serve static files, hold many slow
# client connections and pass on only complete requests, spread requests over several app-server processes
# and machines, and limit request sizes and rates. uvicorn, FastAPI and our service sit behind it and do the
# Python part. The service's own front ends are FastAPI on uvicorn for HTTP and `grpc.aio` for gRPC, in one
# process, sharing one event loop (section 6).
#
# ## 2. Sync and async handlers
#
# uvicorn runs every request's handler on **one event loop, in one thread**. An `async def` handler runs on
# that loop: while it `await`s (a database, another service, the model's thread), the loop serves other
# requests. But a *blocking* call inside `async def` (`time.sleep`, `requests.get`, a model's forward pass)
# holds the whole loop: no other request moves until it returns. A plain `def` handler is run by FastAPI in
# a thread pool instead, so blocking there costs a thread, not the loop.
#
# Three handlers that each wait `DELAY_S` (standing for I/O), under `CLIENTS` concurrent requests:

# %%
DELAY_S = 0.2  # long beside what a request itself costs, even on a busy machine
CLIENTS = 8 if SMALL else 16
waits = FastAPI()


@waits.get("/async-blocking")
async def async_blocking() -> dict[str, str]:
    time.sleep(DELAY_S)  # blocks the event loop: every other request waits too
    return {"handler": "async def + time.sleep"}


@waits.get("/async-awaiting")
async def async_awaiting() -> dict[str, str]:
    await asyncio.sleep(DELAY_S)  # hands the loop back while waiting
    return {"handler": "async def + await asyncio.sleep"}


@waits.get("/sync")
def sync_blocking() -> dict[str, str]:
    time.sleep(DELAY_S)  # plain def: FastAPI runs it in its thread pool, the loop stays free
    return {"handler": "def + time.sleep"}


async def concurrent_gets(url: str, clients: int) -> float:
    """`clients` GET requests at once, one connection each; seconds until the last answer."""
    async with contextlib.AsyncExitStack() as stack:
        pool = [await stack.enter_async_context(httpx.AsyncClient(timeout=60)) for _ in range(clients)]
        start = time.perf_counter()
        responses = await asyncio.gather(*(client.get(url) for client in pool))
        wall_s = time.perf_counter() - start
    assert all(response.status_code == 200 for response in responses)
    return wall_s


with uvicorn_in_thread(waits) as url:
    walls = {
        path: in_thread(asyncio.run, concurrent_gets(url + path, CLIENTS))
        for path in waits.openapi()["paths"]
    }
serial_s = CLIENTS * DELAY_S
show_table(
    ["handler", f"{CLIENTS} concurrent requests (s)", f"x one wait of {DELAY_S * 1000:.0f} ms"],
    [[path, f"{wall:.3f}", f"{wall / DELAY_S:.1f}"] for path, wall in walls.items()],
)
assert walls["/async-blocking"] >= 0.95 * serial_s, "a blocking call in async def serialises all requests"
for path in ("/async-awaiting", "/sync"):
    assert walls[path] < 0.5 * serial_s, f"{path} waits concurrently: at least twice as fast as one by one"
RESULTS["handlers"] = (
    f"{CLIENTS} requests that each wait {DELAY_S * 1000:.0f} ms: async def + time.sleep "
    f"{walls['/async-blocking']:.2f} s, async def + await {walls['/async-awaiting']:.2f} s, "
    f"def {walls['/sync']:.2f} s"
)

# %% [markdown]
# The blocking `async def` handler took `CLIENTS` waits one after another (the assert checks at least 95% of
# that); the awaiting one and the plain `def` one took less than half of it (the assert; the table has the
# times). The service follows the rule: its handlers are `async def` and only `await`; the model
# runs in the dynamic batcher's own thread (`common/serving/batcher.py`), so the loop keeps accepting and
# parsing requests during a forward pass. But a thread only helps if the loop's thread can run at the same
# time as the model's, which brings us to the GIL.
#
# ## 3. The GIL: threads against processes
#
# CPython runs Python bytecode in one thread at a time: a thread must hold the **global interpreter lock**
# to execute bytecode. Threads still help with I/O (a thread waiting on a socket releases the lock), but
# two threads running pure Python take turns on one core. Separate *processes* each have their own
# interpreter and lock. `busy_loop` is a pure-Python loop; we run it `JOBS` times one after another, in
# `JOBS` threads, and in `JOBS` fresh processes (each started with `python -c`, which costs an interpreter
# start, timed separately).

# %%
JOBS = 2
N_ITER = 1_000_000 if SMALL else 10_000_000


def one_after_another(n: int) -> list[int]:
    return [busy_loop(n) for _ in range(JOBS)]


def in_threads(n: int) -> list[int]:
    with ThreadPoolExecutor(JOBS) as pool:
        return list(pool.map(busy_loop, [n] * JOBS))


def in_processes(n: int) -> list[int]:
    code = f"from week07_application_deployment.cpu_work import busy_loop; print(busy_loop({n}))"
    command = [sys.executable, "-c", code]
    workers = [
        subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True) for _ in range(JOBS)
    ]
    return [int(worker.communicate()[0]) for worker in workers]


def fastest_s(fn: Callable[[], object], rounds: int = 2) -> float:
    """Seconds of the fastest of `rounds` calls: background load only ever adds time."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


for run_jobs in (one_after_another, in_threads, in_processes):
    assert run_jobs(1000) == [busy_loop_expected(1000)] * JOBS, f"{run_jobs.__name__} computes the right sum"
gil = {
    "one after another": fastest_s(lambda: one_after_another(N_ITER)),
    f"{JOBS} threads": fastest_s(lambda: in_threads(N_ITER)),
    f"{JOBS} processes": fastest_s(lambda: in_processes(N_ITER)),
    f"{JOBS} processes that do nothing (start-up)": fastest_s(lambda: in_processes(0)),
}
show_table(
    ["how", "seconds", "speed-up"],
    [[k, f"{v:.2f}", f"{gil['one after another'] / v:.2f}x"] for k, v in gil.items()],
)
load_average = os.getloadavg()[0]  # runnable tasks on the machine, averaged over the last minute
thread_speedup = gil["one after another"] / gil[f"{JOBS} threads"]
process_speedup = gil["one after another"] / gil[f"{JOBS} processes"]
# Timings are checked in a full run: CI's small run shares the cores with other tests, which slow any of the
# three at random. Processes can only run at once on cores that other work leaves free: checked in a full run
# on a machine whose load average is below its core count.
if not SMALL:
    assert thread_speedup < 1.25, "threads running pure Python take turns: no speed-up (25% margin for noise)"
free_cores = not SMALL and CORES >= JOBS and load_average < CORES
print(
    f"load average {load_average:.1f} on {CORES} cores: the processes' speed-up is {'' if free_cores else 'not '}checked"
)
if free_cores:
    assert process_speedup > 1.3, "processes run on two cores at once"
RESULTS["GIL"] = (
    f"{JOBS} pure-Python jobs: threads {thread_speedup:.2f}x, processes {process_speedup:.2f}x the speed of one "
    f"after another ({CORES} cores)"
)

# %% [markdown]
# Threads gave no real speed-up (the assert: less than 1.25x, a margin for noise): one GIL, one thread
# at a time. Processes each have their own interpreter and GIL, so they can run on two cores at once, if
# the cores are free: the cell asserts more than 1.3x in a full run when the machine's load average is below
# its core count, and prints whether it did (with the load average it saw: a shared machine gives processes
# no second core). The start-up row is what `python -c` itself costs, included in the processes' time.
#
# So how can the batcher run the model in a thread while the event loop parses requests? **PyTorch releases
# the GIL** inside its operators: while a matrix product runs in C++, other Python threads run. To see it,
# this thread counts in a Python loop while a background thread makes one long call: matrix products, or
# `sum(range(n))`, a C function that keeps the GIL until it returns. Counting needs the GIL, so the count
# says how much Python ran beside the call.

# %%
torch.set_num_threads(1)  # as the service runs its model: one thread for the forward pass
square = torch.randn(1024, 1024)
N_SUM = (
    50_000_000 if SMALL else 100_000_000
)  # long beside the 5 ms after which a thread must hand over the GIL


def python_progress_during(call: Callable[[], object]) -> float:
    """Loop iterations per second this thread gets through while `call` runs in a background thread."""
    worker = threading.Thread(target=call)
    ticks = 0
    start = time.perf_counter()
    worker.start()
    while worker.is_alive():
        ticks += 1
    return ticks / (time.perf_counter() - start)


progress = {
    "torch matmuls (GIL released)": python_progress_during(
        lambda: [square @ square for _ in range(N_SUM // 10**7)]
    ),
    "sum(range(n)) (GIL held)": python_progress_during(lambda: sum(range(N_SUM))),
}
show_table(
    ["background call", "this thread's loop iterations per second"],
    [[k, f"{v:,.0f}"] for k, v in progress.items()],
)
gil_ratio = progress["torch matmuls (GIL released)"] / max(progress["sum(range(n)) (GIL held)"], 1.0)
assert gil_ratio > 10, "a torch op lets other Python threads run; a C call that keeps the GIL stops them"
RESULTS["GIL released by torch"] = (
    f"a Python loop ran {gil_ratio:.0f}x faster beside matmuls than beside sum(range(n))"
)

# %% [markdown]
# Beside the matrix products this thread's loop ran more than 10 times faster than beside `sum(range(n))`
# (the assert; the table has the rates): inside torch's operators the GIL is free, while the C call held
# it from start to end. That is what the service relies on: one thread runs the model, the event loop runs
# in the other. It also says what does *not* work: CPU-heavy Python in a handler (decoding in pure Python,
# tokenising in a Python loop) takes the GIL from the loop, however many threads there are. For that, and
# for more cores than one model thread uses, the answer is more processes.
#
# ## 4. Workers and processes
#
# `uvicorn --workers 4 module:app` starts four processes that accept on the same port; each imports the app
# (hence the string) and so **loads its own copy of the model**. We start the real service three times:
# once with the tiny model, twice with the wide one (as two workers would), and read each process's
# resident memory.

# %%
weight_bytes = sum(
    t.numel() * t.element_size() for t in load_classifier(wide_model).module.state_dict().values()
)
no_grpc = {"grpc_port": None}
with servers_started(
    **{
        "tiny model": (tiny_model, no_grpc),
        "wide model, worker 1": (wide_model, no_grpc),
        "wide model, worker 2": (wide_model, no_grpc),
    }
) as servers:
    rss = {name: psutil.Process(server.process.pid).memory_info().rss for name, server in servers.items()}
    pids = {name: server.process.pid for name, server in servers.items()}
show_table(
    ["server process", "pid", "resident memory (MB)"], [[k, pids[k], f"{v / MB:.0f}"] for k, v in rss.items()]
)
extra = {name: rss[name] - rss["tiny model"] for name in rss if name.startswith("wide")}
print(
    f"wide model's weights: {weight_bytes / MB:.0f} MB; each wide worker holds "
    + ", ".join(f"{v / MB:.0f} MB" for v in extra.values())
    + " more than the tiny one"
)
assert len(set(pids.values())) == 3
assert all(v >= 0.9 * weight_bytes for v in extra.values()), "every worker holds its own copy of the weights"
RESULTS["workers"] = (
    f"each process holds its own {weight_bytes / MB:.0f} MB of weights: a wide worker uses "
    f"{min(extra.values()) / MB:.0f}-{max(extra.values()) / MB:.0f} MB more than a tiny one "
    f"(tiny: {rss['tiny model'] / MB:.0f} MB)"
)

# %% [markdown]
# Each wide worker holds at least 90% of the weights' bytes more than the tiny one (the assert): N workers,
# N copies. What else N workers would change for this service:
#
# - **Memory**: N copies of the weights (on a GPU: N CUDA contexts, and N copies in GPU memory, which is
#   usually what runs out first).
# - **Batching**: the kernel spreads connections over the workers, so each worker's batcher sees about 1/N
#   of the concurrent requests: smaller batches, and less of what section 5 gains.
# - **Cores**: what N workers do buy is N event loops (and N GILs) for the HTTP work. With a model that one
#   batcher can keep busy, the usual layout is one model process per accelerator, and scale by replicas
#   (more containers behind the load balancer of section 1) rather than by workers inside one.
#
# The service therefore runs one process with one batcher, and leaves the number of processes to the
# deployment.
#
# ## 5. Dynamic batching
#
# A batch-1 forward pass of a wide layer reads every weight from memory to do 2 FLOPs with it; a batch of B
# does 2B FLOPs per weight read, until compute is the limit. First, in this process, the model's time per
# image against the batch size, timed by `common.bench`:

# %%
classifier = load_classifier(wide_model)
pixels = [decode_image(png, size=classifier.image_size, max_pixels=10**6) for png, _ in held_out]
BATCHES = (1, 4, 16, 64) if SMALL else (1, 2, 4, 8, 16, 32, 64)
per_image_ms = {
    b: bench(lambda b=b: classifier.predict(pixels[:b]), device="cpu", name=f"batch {b}").median_ms / b
    for b in BATCHES
}
show_table(
    ["batch", "ms per image", "images/s (one thread)"],
    [[b, f"{ms:.3f}", f"{1000 / ms:.0f}"] for b, ms in per_image_ms.items()],
)
gain = per_image_ms[1] / min(per_image_ms.values())
print(f"one thread: {gain:.1f}x more images per second at the best batch than at batch 1")
if not SMALL:  # the full-size model; a CI machine running other tests beside this one cannot hold timings
    assert gain > 3, "the wide model's forward pass is memory-bound at batch 1"
RESULTS["forward pass"] = (
    f"wide model, one thread: {per_image_ms[1]:.2f} ms per image at batch 1, "
    f"{min(per_image_ms.values()):.2f} ms at the best batch ({gain:.1f}x)"
)

# %% [markdown]
# In the full run the best batch gave more than 3 times the images per second of batch 1 (the assert; the
# table has the whole curve, which on a CPU is not smooth: the matrix library picks different kernels for
# different batch sizes). This is the gain that the service can pass on, if it can form the batches.
#
# Now the real service, in its own process, at `--max-batch 1` (the baseline) and with dynamic batching
# (`--max-batch 32 --max-wait-ms 5`), each driven by the closed-loop load generator
# (`common.serving.loadgen`) at several concurrencies: each simulated client sends its next image when its
# last answer arrives. Throughput and latency come from the client; the batch sizes the server really ran
# come from its `/metrics` histogram.

# %%
CONCURRENCIES = (1, 8) if SMALL else (1, 4, 16, 64)
SETTINGS = {
    "batch 1": {"max_batch": 1, "max_wait_ms": 0},
    "max 32, 5 ms": {"max_batch": 32, "max_wait_ms": 5},
}
DURATION_S = None if SMALL else 4.0  # seconds of load per point (small: a fixed number of requests)


@dataclass
class Point:
    """One measurement: a server setting under `concurrency` clients."""

    setting: str
    concurrency: int
    load: LoadResult
    mean_batch: float
    metrics_before: str
    metrics_after: str


def measure(server: ServerProcess, setting: str, concurrency: int) -> Point:
    """Warm up, then drive the server; the batch sizes are the /metrics histogram's change over the run."""
    url = f"{server.http_url}/predict"
    in_thread(run_load, url, uploads, concurrency=concurrency, n_requests=2 * concurrency)  # warm-up
    before = httpx.get(f"{server.http_url}/metrics").text
    load = in_thread(
        run_load, url, uploads, concurrency=concurrency,
        n_requests=4 * concurrency if SMALL else None, duration_s=DURATION_S,
    )  # fmt: skip
    after = httpx.get(f"{server.http_url}/metrics").text
    batches = {k: batch_size_histogram(after)[k] - batch_size_histogram(before)[k] for k in ("count", "sum")}
    return Point(setting, concurrency, load, batches["sum"] / batches["count"], before, after)


points: list[Point] = []
with servers_started(
    **{setting: (wide_model, {"grpc_port": None, **flags}) for setting, flags in SETTINGS.items()}
) as servers:
    # One server at a time (the other waits idle), alternating at each concurrency so that a change in the
    # machine's background load hits both settings alike.
    for concurrency in CONCURRENCIES:
        for setting, server in servers.items():
            points.append(measure(server, setting, concurrency))
show_table(
    ["setting", "clients", "requests", "req/s", "p50 (ms)", "p99 (ms)", "mean batch"],
    [
        [p.setting, p.concurrency, len(p.load.records), f"{p.load.throughput:.1f}",
         f"{p.load.latency_percentiles()['p50']:.1f}", f"{p.load.latency_percentiles()['p99']:.1f}",
         f"{p.mean_batch:.1f}"]
        for p in sorted(points, key=lambda p: (list(SETTINGS).index(p.setting), p.concurrency))
    ],
)  # fmt: skip

# %% [markdown]
# Every answer must be right before any number counts: all requests got 200, and the labels match the
# images' classes. Then what batching must do: with one client there is never a second request to batch
# with (mean batch exactly 1); with many, the batcher groups them.

# %%
point = {(p.setting, p.concurrency): p for p in points}
labels = [label for _, label in held_out]
classes = classifier.classes
for p in points:
    assert p.load.status_counts == {200: len(p.load.records)}, (
        f"{p.setting}, {p.concurrency}: {p.load.status_counts}"
    )
    correct = np.mean([r.body["label"] == classes[labels[r.upload]] for r in p.load.records])
    assert correct >= 0.9, f"{p.setting}, {p.concurrency} clients: only {correct:.0%} of the labels are right"
top = max(CONCURRENCIES)
assert all(point["batch 1", c].mean_batch == 1 for c in CONCURRENCIES), "--max-batch 1 never batches"
assert point["max 32, 5 ms", 1].mean_batch == 1, "one closed-loop client has nothing to batch with"
assert point["max 32, 5 ms", top].mean_batch > 2, f"{top} clients: the batcher groups their requests"
speedup = point["max 32, 5 ms", top].load.throughput / point["batch 1", top].load.throughput
print(f"{top} clients: batching served {speedup:.1f}x the requests per second of batch size 1")
# Checked in the full run, with the wide model (in small runs the forward pass is cheap and HTTP dominates):
if not SMALL:
    assert speedup > 2, "with many clients, batching at least doubles the throughput"
    few = CONCURRENCIES[1]
    batch1_growth = point["batch 1", top].load.throughput / point["batch 1", few].load.throughput
    batched_growth = point["max 32, 5 ms", top].load.throughput / point["max 32, 5 ms", few].load.throughput
    p99_growth = (
        point["batch 1", top].load.latency_percentiles()["p99"]
        / point["batch 1", few].load.latency_percentiles()["p99"]
    )
    print(
        f"from {few} to {top} clients: throughput x{batch1_growth:.2f} at batch 1 (p99 x{p99_growth:.1f}), "
        f"x{batched_growth:.2f} batched"
    )
    assert batch1_growth < 1.5, (
        "at batch size 1 the model is already busy: more clients add little throughput"
    )
    assert p99_growth > 2, "...only queueing: p99 grows with the number of clients"
    assert batched_growth > 1.3, "batched, more clients make bigger batches and more throughput"
    # The fastest request of a run is the one that met no interference: background load only adds time.
    fastest = {s: min(r.latency_ms for r in point[s, 1].load.ok) for s in SETTINGS}
    print(
        f"one client, fastest request: {fastest['batch 1']:.1f} ms at batch 1, "
        f"{fastest['max 32, 5 ms']:.1f} ms batched (the batcher's wait: {SETTINGS['max 32, 5 ms']['max_wait_ms']} ms)"
    )
    assert fastest["max 32, 5 ms"] > fastest["batch 1"], "with one client, batching only adds its wait"
RESULTS["batching"] = (
    f"{top} clients: {point['max 32, 5 ms', top].load.throughput:.0f} req/s batched (mean batch "
    f"{point['max 32, 5 ms', top].mean_batch:.1f}, p99 {point['max 32, 5 ms', top].load.latency_percentiles()['p99']:.0f} ms) "
    f"against {point['batch 1', top].load.throughput:.0f} req/s at batch 1 "
    f"(p99 {point['batch 1', top].load.latency_percentiles()['p99']:.0f} ms): {speedup:.1f}x"
)

# %%
fig, ax = plt.subplots(figsize=(6.5, 4))
for setting, colour in zip(SETTINGS, ("tab:red", "tab:blue"), strict=True):
    line = [p for p in points if p.setting == setting]
    xs = [p.load.throughput for p in line]
    ys = [p.load.latency_percentiles()["p99"] for p in line]
    ax.plot(xs, ys, "o-", color=colour, label=setting)
    for p, x, y in zip(line, xs, ys, strict=True):
        ax.annotate(f"{p.concurrency} clients, batch {p.mean_batch:.1f}", (x, y), textcoords="offset points",
                    xytext=(5, 4), fontsize=8, color=colour)  # fmt: skip
ax.set_xlabel("throughput (requests/s)")
ax.set_ylabel("p99 latency (ms)")
ax.set_title("the service under closed-loop load: batch size 1 against dynamic batching")
ax.set_xlim(0, 1.35 * max(p.load.throughput for p in points))
ax.set_ylim(bottom=0)
ax.grid(alpha=0.3)
ax.legend(loc="upper left")
plt.show()

# %% [markdown]
# How to read it (the numbers are the table's). Each curve is one server; moving along it, more clients.
# At batch size 1 the model is busy all the time from a few clients on: in the full run, going from 4 to 64
# clients added less than 50% throughput and more than doubled p99 (the asserts): more clients mostly
# queue. Dynamic batching turns the same queue into bigger batches, so throughput keeps growing (more than
# 30% from 4 to 64 clients, the assert), and at 64 clients it served more than twice the requests per
# second of batch size 1 (the assert).
#
# Where batching stops paying:
#
# - **At low load.** One client has nothing to batch with (mean batch exactly 1, the assert), and each
#   request waits up to `--max-wait-ms` for company that never comes (in the full run the batched server's
#   fastest request at one client was slower than batch size 1's, the assert; both are printed). A real
#   service sets `max_wait_ms` to a small fraction of its latency budget.
# - **At the batch limit.** A batch never exceeds `--max-batch`: at 64 clients the batched server ran
#   batches of up to 32 (the table's mean batch), so half the clients wait a whole forward pass for the
#   next batch. A larger limit helps only while the first table's per-image time still falls.
# - **When the model is cheap.** With the tiny model the forward pass is less than half of a request's time
#   (section 6 checks it), so batching it can save at most that part; the rest is the serving stack.
#
# ## 6. gRPC and HTTP
#
# The service answers the same `Predict` over HTTP (multipart upload, JSON answer) and gRPC (a protobuf
# message over HTTP/2; `classifier.proto`). Both submit to the same batcher. One server, the tiny model
# (so the model costs little and the protocol shows), batch size 1, the same images, one request at a time
# from one client of each kind that keeps its connection:

# %%
N_SEQUENTIAL = 32 if SMALL else 400
pb2, pb2_grpc = load_stubs()
tiny_classifier = load_classifier(tiny_model)


def http_predictions(server: ServerProcess) -> tuple[list[str], list[float]]:
    labels_, times_ = [], []
    with httpx.Client(timeout=30) as client:
        for i in range(N_SEQUENTIAL):
            start = time.perf_counter()
            response = client.post(
                f"{server.http_url}/predict", files={"file": ("image.png", held_out[i % 64][0], "image/png")}
            )
            times_.append(1000 * (time.perf_counter() - start))
            labels_.append(response.json()["label"])
    return labels_, times_


def grpc_predictions(server: ServerProcess) -> tuple[list[str], list[float]]:
    labels_, times_ = [], []
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb2_grpc.ClassifierStub(channel)
        for i in range(N_SEQUENTIAL):
            start = time.perf_counter()
            reply = stub.Predict(pb2.PredictRequest(image=held_out[i % 64][0]), timeout=30)
            times_.append(1000 * (time.perf_counter() - start))
            labels_.append(reply.label)
    return labels_, times_


with servers_started(grpc_and_http=(tiny_model, {"max_batch": 1, "max_wait_ms": 0})) as started:
    server = started["grpc_and_http"]
    http_predictions(server), grpc_predictions(server)  # warm-up: connections, first calls
    http_labels, http_ms = http_predictions(server)
    grpc_labels, grpc_ms = grpc_predictions(server)
    http_request = httpx.Request(
        "POST", f"{server.http_url}/predict", files={"file": ("image.png", held_out[0][0], "image/png")}
    )
    json_answer = httpx.post(
        f"{server.http_url}/predict", files={"file": ("image.png", held_out[0][0], "image/png")}
    ).content
    shutdown_code = server.stop(sig=signal.SIGTERM)  # as `docker stop` does: section 8 reads what it printed
    shutdown_log = server.output()
forward_ms = bench(lambda: tiny_classifier.predict(pixels[:1]), device="cpu").median_ms
png_bytes = len(held_out[0][0])
http_body = len(http_request.read())
grpc_body = pb2.PredictRequest(image=held_out[0][0]).ByteSize()
proto_answer = pb2.PredictReply(
    label=grpc_labels[0], probabilities=dict.fromkeys(tiny_classifier.classes, 0.25)
).ByteSize()
show_table(
    ["", "HTTP/1.1 + multipart + JSON", "gRPC (HTTP/2 + protobuf)"],
    [
        ["p50 latency (ms)", f"{np.median(http_ms):.2f}", f"{np.median(grpc_ms):.2f}"],
        ["p99 latency (ms)", f"{np.percentile(http_ms, 99):.2f}", f"{np.percentile(grpc_ms, 99):.2f}"],
        [f"request body, a {png_bytes}-byte PNG (bytes)", http_body, grpc_body],
        ["answer body (bytes)", len(json_answer), proto_answer],
    ],
)
print(f"the tiny model's forward pass alone: {forward_ms:.3f} ms (batch 1, one thread)")
assert http_labels == grpc_labels, "the same images get the same answers over both protocols"
assert (
    np.mean([label == tiny_classifier.classes[labels[i % 64]] for i, label in enumerate(grpc_labels)]) >= 0.9
)
assert grpc_body < http_body and proto_answer < len(json_answer), (
    "protobuf's framing is smaller than multipart's and JSON's"
)
grpc_speedup = np.median(http_ms) / np.median(grpc_ms)
if not SMALL:  # timings: checked in a full run (CI's small run shares the cores with other tests)
    assert 0.5 < grpc_speedup < 2, (
        "one request at a time, the two protocols cost the same within a factor of 2"
    )
    assert forward_ms < 0.5 * min(np.median(http_ms), np.median(grpc_ms)), (
        "the tiny model is a small part of a request"
    )
RESULTS["gRPC vs HTTP"] = (
    f"tiny model, one client: p50 {np.median(grpc_ms):.2f} ms over gRPC, {np.median(http_ms):.2f} ms over HTTP "
    f"({grpc_speedup:.2f}x); the forward pass itself {forward_ms:.2f} ms"
)

# %% [markdown]
# Both protocols gave the same label for every image (the assert). The protobuf request and answer are
# smaller than the multipart request and the JSON answer (checked; the table has the sizes). One request at a time on a kept connection, their median latencies were within a
# factor of 2 of each other (the assert; the table has the numbers): for one small request, neither protocol
# is the bottleneck of this service. With the tiny model the forward pass is less than half of either
# request's time (checked): at this size the serving stack, not the model, is the cost. Why choose one or
# the other, then:
#
# - **gRPC**: a typed contract (`.proto`) from which clients in every language are generated, compact
#   binary messages, HTTP/2 streams (many calls on one connection, streaming answers), deadlines that
#   travel with the call, and the standard health service that Kubernetes probes. Between services it is
#   the usual choice.
# - **HTTP + JSON**: anything can call it (`curl`, a browser, any language without generated code), and
#   every proxy, cache and log understands it. For a public endpoint that usually decides it.
#
# ## 7. Metrics and alerting
#
# The service exports Prometheus metrics at `/metrics`. Prometheus scrapes that page every few seconds and
# stores every sample. Latency is a **histogram**: cumulative counters of requests whose latency was at most
# each bucket's upper bound `le`. The server cannot export a p99 (a percentile cannot be added up over time
# or over replicas), but counters can, and PromQL computes a quantile from them:
# `histogram_quantile(0.99, rate(classifier_request_latency_seconds_bucket[5m]))`. Here is what the
# batched server exported over its run at the most clients of section 5 (the counters' change over the run,
# which is what `rate()` takes):


# %%
def latency_buckets(metrics_text: str, endpoint: str = "/predict") -> list[tuple[float, float]]:
    """(le, cumulative count) of classifier_request_latency_seconds for one endpoint, from a /metrics page."""
    for family in text_string_to_metric_families(metrics_text):
        if family.name == "classifier_request_latency_seconds":
            return sorted(
                (float(s.labels["le"]), s.value)
                for s in family.samples
                if s.name.endswith("_bucket") and s.labels["endpoint"] == endpoint
            )
    raise ValueError("the /metrics page has no classifier_request_latency_seconds histogram")


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """PromQL's histogram_quantile: find the bucket that holds the q-quantile's rank and interpolate linearly
    inside it (as if its observations were spread evenly). The first bucket starts at 0; a rank in the +Inf
    bucket returns the highest finite bound."""
    total = buckets[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return lower
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    raise ValueError("the last bucket must be +Inf and hold every observation")


run = point["max 32, 5 ms", top]
before, after = latency_buckets(run.metrics_before), latency_buckets(run.metrics_after)
run_buckets = [(le, a - b) for (le, a), (_, b) in zip(after, before, strict=True)]
show_table(["le (s)", "requests at most le"], [[f"{le:g}", f"{count:.0f}"] for le, count in run_buckets])
estimate_ms = 1000 * histogram_quantile(0.99, run_buckets)
client_p99_ms = run.load.latency_percentiles()["p99"]
bucket_of_estimate = next(
    i for i, (le, count) in enumerate(run_buckets) if count >= 0.99 * run_buckets[-1][1]
)
bucket_low_ms = 1000 * (run_buckets[bucket_of_estimate - 1][0] if bucket_of_estimate else 0.0)
bucket_high_ms = 1000 * run_buckets[bucket_of_estimate][0]
print(
    f"p99 from the server's histogram: {estimate_ms:.0f} ms (its bucket: {bucket_low_ms:g}-{bucket_high_ms:g} ms); "
    f"p99 measured by the clients: {client_p99_ms:.0f} ms"
)
assert run_buckets[-1][1] == len(run.load.records), (
    "the histogram counted exactly the requests the clients sent"
)
assert client_p99_ms >= bucket_low_ms, (
    "a client's latency includes the server's: its p99 is not below the bucket"
)
RESULTS["metrics"] = (
    f"p99 at {top} clients: {estimate_ms:.0f} ms from the histogram (bucket {bucket_low_ms:g}-{bucket_high_ms:g} ms), "
    f"{client_p99_ms:.0f} ms measured by the clients"
)

# %% [markdown]
# The histogram counted exactly the requests the clients sent (the assert), so it saw the same run. Its
# p99 is an *estimate*: all it knows is which bucket the 99th percentile falls in, and it interpolates inside
# that bucket. The true server-side p99 lies somewhere in the printed bucket, so the buckets must be chosen
# around the latencies that matter (the service's go from 1 ms to 10 s). The client's p99 cannot lie below the
# bucket (the assert): every request's client-side latency includes its server-side latency, plus the
# network and the client's own work, which the server's histogram never sees. Measure at the client as
# well when you can.
#
# An **alert** is a PromQL condition that must hold for a while before anyone is paged. The service's rule
# (`deploy/prometheus/alerts.yml`, the file Prometheus loads), its condition evaluated here on the two
# servers' histograms at the most clients (a few seconds of load: the condition, not yet the `for:`):

# %%
ALERTS = REPO_ROOT / "week07_application_deployment" / "deploy" / "prometheus" / "alerts.yml"
rule = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"][0]
threshold_s = float(rule["expr"].rsplit(">", 1)[1])
print(f"{rule['alert']}: {' '.join(rule['expr'].split())}\nfor: {rule['for']}")
for setting in SETTINGS:
    p = point[setting, top]
    buckets = [
        (le, a - b)
        for (le, a), (_, b) in zip(
            latency_buckets(p.metrics_after), latency_buckets(p.metrics_before), strict=True
        )
    ]
    value = histogram_quantile(0.99, buckets)
    print(
        f"{setting:>14}, {top} clients: histogram p99 {value * 1000:.0f} ms -> "
        + (
            f"above {threshold_s:g} s: pending, firing if it lasts {rule['for']}"
            if value > threshold_s
            else "ok"
        )
    )

# %% [markdown]
# Two more rules every model service wants: an error ratio
# (`sum(rate(classifier_requests_total{status!~"2.."}[5m])) / sum(rate(classifier_requests_total[5m]))`),
# and saturation, `classifier_queue_depth` staying high, which says the replicas cannot keep up before the
# latency does. Alert on what users feel (latency, errors), and keep the rest on dashboards.
#
# ## 8. Containers
#
# The service ships as a container image (the Dockerfile is in `deploy/`, beside this notebook). What the
# image needs follows from what the server process loads: Python, the locked dependencies (torch for the CPU,
# FastAPI, uvicorn, grpcio, prometheus-client), the service's own modules and the exported `.pt2` file, and
# nothing of training: the exported program carries its graph, weights and contract (class names, image
# size). Checked: loading the model in a fresh interpreter imports none of the training code.

# %%
probe = (
    "import sys; from week07_application_deployment.classifier import load_classifier; "
    f"c = load_classifier({str(wide_model)!r}); "
    "print(c.classes, 'week07_application_deployment.train' in sys.modules)"
)
loaded = subprocess.run(
    [sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, check=True
)
print(loaded.stdout.strip())
assert loaded.stdout.strip().endswith("False"), "the exported model loads without the training code"

# %% [markdown]
# What the image's layout is for:
#
# - **A pinned base and the locked environment**, so the image built next month runs the same versions as
#   the one tested today; the CPU build of torch, since this service runs on a CPU.
# - **The model file baked in or mounted** read-only; the container's `/ready` (or gRPC health) tells the
#   orchestrator when it may receive traffic, `/health` that the process is alive.
# - **The server as PID 1** (no shell around it), so that `docker stop` and Kubernetes' SIGTERM reach it:
#   the service then stops accepting, answers what it has and exits 0, before the SIGKILL that follows
#   after a grace period. Section 6's server was stopped that way, with SIGTERM; what it printed, and its
#   exit code:

# %%
print(shutdown_log.strip(), f"\nexit code {shutdown_code}")
assert shutdown_code == 0 and shutdown_log.strip().endswith("stopped"), (
    "SIGTERM: a graceful shutdown, exit code 0"
)

# %% [markdown]
# ## Summary
#
# - uvicorn speaks HTTP and runs the event loop; FastAPI routes, validates and serialises; a web server in
#   front terminates TLS, buffers clients and balances load.
# - On the event loop, `async def` handlers must only `await`: one blocking call serialised every request;
#   blocking work goes to a thread (`def` handlers, the batcher's model thread).
# - The GIL lets one thread run Python at a time: threads gave pure Python no speed-up, processes can;
#   torch releases the GIL, so the event loop's Python runs beside the model's thread.
# - Each worker process holds its own copy of the model; scale a model service by replicas, one batcher per
#   model copy.
# - Dynamic batching multiplies throughput under many clients and costs up to `max_wait_ms` at low load;
#   its gain ends where the forward pass becomes compute-bound, or where the model is not the cost.
# - gRPC and HTTP gave the same answers; gRPC's messages are smaller, and one request at a time their
#   latencies were within a factor of 2; choose by who calls the service, not by speed.
# - A p99 from histogram buckets is an estimate within one bucket, and it misses the client's side; alert
#   on such quantiles and on error ratios.

# %% tags=["summary"]
for key, line in RESULTS.items():
    print(f"{key}: {line}")
