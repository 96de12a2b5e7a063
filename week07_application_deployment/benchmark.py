"""`effdl bench serving`: batch size 1 against dynamic batching, 64 concurrent clients, on this machine.

For each batching setting the server starts in its own process, warms up, then takes closed-loop load from
the async load generator (common.serving.loadgen) for a fixed time; throughput and latency percentiles come
from the client side, the batch sizes the server really ran from its /metrics histogram. The settings run in
rounds (A B C D, A B C D, ...) so that a change in background load hits all of them; a setting's figures pool its
rounds. Results: serving_batching.json, and serving_batching.png (throughput against p99 latency).

The model is the wide one (train.py --width 4096 --depth 3): a batch-1 forward pass reads ~235 MB of weights
to classify one image, so the forward pass, not HTTP, dominates a request, which is when batching can pay.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from common.bench import save_results
from common.environment import environment
from common.serving.loadgen import LoadResult, Upload, run_load
from common.weeks import REPO_ROOT
from week07_application_deployment.classifier import load_classifier
from week07_application_deployment.images import example_images
from week07_application_deployment.process import ServerProcess

__all__ = ["BENCH_MODEL", "Setting", "batch_size_histogram", "run_serving_benchmark"]

BENCH_MODEL = {"width": 4096, "depth": 3, "steps": 30}
QUICK_MODEL = {"width": 64, "depth": 1, "steps": 20}


@dataclass(frozen=True)
class Setting:
    """One server configuration to measure."""

    max_batch: int
    max_wait_ms: float

    @property
    def name(self) -> str:
        return "batch 1" if self.max_batch == 1 else f"max {self.max_batch}, {self.max_wait_ms:g} ms"


SETTINGS = (Setting(1, 0), Setting(4, 2), Setting(8, 2), Setting(16, 2), Setting(32, 5))


def batch_size_histogram(metrics_text: str) -> dict[str, float]:
    """count and sum of classifier_batch_size from a /metrics page (Prometheus text format)."""
    for family in text_string_to_metric_families(metrics_text):
        if family.name == "classifier_batch_size":
            values = {s.name: s.value for s in family.samples}
            return {
                "count": values["classifier_batch_size_count"],
                "sum": values["classifier_batch_size_sum"],
            }
    raise ValueError("the /metrics page has no classifier_batch_size histogram")


def _model(out_dir: Path, params: dict[str, int]) -> Path:
    """The benchmark's model, trained once and kept in build/ (reused while its parameters match)."""
    from week07_application_deployment.train import TrainConfig, export, train

    path = out_dir / f"bench_w{params['width']}_d{params['depth']}_s{params['steps']}.pt2"
    if path.is_file() and all(load_classifier(path).meta["train"].get(k) == v for k, v in params.items()):
        return path
    config = TrainConfig(**params)
    print(f"training the benchmark model ({params}) ...", flush=True)
    model, stats = train(config)
    print(f"held-out accuracy {stats['held_out_accuracy']:.3f}, {stats['train_s']:.0f} s", flush=True)
    return export(model, config, path, stats)


def _measure(
    server: ServerProcess, uploads: list[Upload], concurrency: int, duration_s: float
) -> tuple[LoadResult, dict[str, float]]:
    load_before = os.getloadavg()[0]
    before = batch_size_histogram(httpx.get(f"{server.http_url}/metrics").text)
    result = run_load(
        f"{server.http_url}/predict",
        uploads,
        concurrency=concurrency,
        duration_s=duration_s,
        keep_bodies=False,
    )
    after = batch_size_histogram(httpx.get(f"{server.http_url}/metrics").text)
    # Other processes on the machine take cores from the server and the clients: the load average says so.
    return result, {
        **{k: after[k] - before[k] for k in after},
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }


def run_serving_benchmark(
    out_dir: Path,
    *,
    quick: bool = False,
    concurrency: int = 64,
    duration_s: float | None = None,
    rounds: int | None = None,
    settings: tuple[Setting, ...] = SETTINGS,
) -> list[Path]:
    """Measure every setting under `concurrency` clients; save JSON and a plot in out_dir; return the paths."""
    import torch

    duration_s = duration_s or (2.0 if quick else 10.0)
    rounds = rounds or (1 if quick else 3)
    model = _model(REPO_ROOT / "build" / "week07", QUICK_MODEL if quick else BENCH_MODEL)
    uploads = [Upload(png) for png, _ in example_images(64, num_classes=4, size=32, seed=10_000)]
    pooled: dict[Setting, list[tuple[LoadResult, dict[str, float]]]] = {s: [] for s in settings}
    for round_ in range(rounds):
        for setting in settings:
            with ServerProcess.start(
                model, grpc_port=None, max_batch=setting.max_batch, max_wait_ms=setting.max_wait_ms
            ) as server:
                run_load(
                    f"{server.http_url}/predict",
                    uploads,
                    concurrency=concurrency,
                    duration_s=min(2.0, duration_s),
                )
                result, batches = _measure(server, uploads, concurrency, duration_s)
            pooled[setting].append((result, batches))
            print(
                f"round {round_ + 1}/{rounds}  {setting.name:>14}: {result.throughput:7.1f} req/s, "
                f"p50 {result.latency_percentiles()['p50']:7.1f} ms, p99 {result.latency_percentiles()['p99']:7.1f} ms, "
                f"mean batch {batches['sum'] / max(batches['count'], 1):.1f}",
                flush=True,
            )
    rows = []
    for setting, runs in pooled.items():
        merged = LoadResult(
            url=runs[0][0].url, concurrency=concurrency, duration_s=sum(r.duration_s for r, _ in runs)
        )
        for result, _ in runs:
            merged.records.extend(result.records)
        batches = {k: sum(b[k] for _, b in runs) for k in ("count", "sum")}
        rows.append({
            "setting": setting.name, "max_batch": setting.max_batch, "max_wait_ms": setting.max_wait_ms,
            **merged.summary(), "mean_batch_size": batches["sum"] / max(batches["count"], 1),
            "batches": batches["count"],
            "rounds": [{**r.summary(), "load_average": [b["load_before"], b["load_after"]]} for r, b in runs],
        })  # fmt: skip
    baseline = next(row for row in rows if row["max_batch"] == 1)
    best = max(rows, key=lambda row: row["throughput_rps"])
    record = {
        "benchmark": "week 7: dynamic batching vs batch size 1, closed-loop HTTP load",
        "command": "effdl bench serving" + (" --quick" if quick else ""),
        "concurrency": concurrency,
        "duration_s_per_round": duration_s,
        "rounds": rounds,
        "model": {"file": model.name, **(QUICK_MODEL if quick else BENCH_MODEL)},
        "server": {"torch_threads": 1, "processes": 1, "inference_workers": 1},
        "results": rows,
        "speedup": {
            "best_setting": best["setting"],
            "throughput_ratio_vs_batch_1": best["throughput_rps"] / baseline["throughput_rps"],
            "p99_ms": best["latency_ms"]["p99"],
            "batch_1_p99_ms": baseline["latency_ms"]["p99"],
        },
        "machine": f"{os.cpu_count()} CPU cores, shared by the server, the load generator and other work",
        "env": environment(torch.device("cpu")),
    }
    suffix = "_quick" if quick else ""
    json_path = save_results(record, out_dir / f"serving_batching{suffix}.json")
    png_path = _plot(rows, out_dir / f"serving_batching{suffix}.png", concurrency)
    return [json_path, png_path]


def _plot(rows: list[dict[str, Any]], path: Path, concurrency: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        x, y = row["throughput_rps"], row["latency_ms"]["p99"]
        ax.scatter([x], [y], color="tab:red" if row["max_batch"] == 1 else "tab:blue")
        ax.annotate(
            f"{row['setting']} (mean batch {row['mean_batch_size']:.1f})",
            (x, y),
            textcoords="offset points",
            xytext=(6, 4),
            fontsize=8,
        )
    ax.set_xlabel("throughput (requests/s)")
    ax.set_ylabel("p99 latency (ms)")
    ax.set_title(f"dynamic batching, {concurrency} concurrent clients")
    ax.set_xlim(0, 1.6 * max(row["throughput_rps"] for row in rows))  # room for the labels
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
