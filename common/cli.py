"""`effdl`: the course's command line. Thin: it parses arguments and calls the library modules.

Every command has `--help`. Problems a user can fix (an unknown week, a missing tool) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from common.errors import EffdlError, MissingDependencyError
from common.weeks import REPO_ROOT, get_week

DEFAULT_BUILD_DIR = REPO_ROOT / "build"
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
OUT_HELP = "folder for the results (default: benchmarks/results/<this machine>, e.g. .../nvidia-h200)"


def results_dir(out: str | None) -> Path:
    """--out, or this machine's own folder under benchmarks/results (its GPU, or its CPU without one)."""
    from common.environment import device_folder

    return Path(out) if out else RESULTS_DIR / device_folder()


# The course environment's packages (pyproject.toml's dependencies) by the names they are imported as. One of
# them missing means the environment is not synced; any other ModuleNotFoundError is a bug, shown in full.
COURSE_PACKAGES = frozenset({
    "torch", "torchvision", "triton", "numpy", "matplotlib", "PIL", "rich", "packaging",
    "jupyterlab", "ipykernel", "jupytext", "nbclient", "nbformat",
    "pytest", "xdist", "pytest_timeout", "nbval", "hypothesis", "ruff", "pytest_cov",
    "wandb", "dvc", "hydra",
    "fastapi", "uvicorn", "python_multipart", "grpc", "grpc_tools", "grpc_health", "httpx", "prometheus_client",
})  # fmt: skip

MAIN_EPILOG = """\
examples:
  effdl env                              what hardware and software this machine has
  effdl seminar week01_intro             run the week-1 seminar headless (small on CPU, full on GPU)
  effdl slides week01_intro --pdf        build the week-1 lecture to HTML and PDF
  effdl check                            every seminar (small), every deck, every grader self-test
  effdl grade week03 submissions/        grade a folder of submissions into a gradebook
  effdl test                             the whole test suite, as CI runs it
"""


def cmd_env(args: argparse.Namespace) -> int:
    """Print a hardware and software report of this machine."""
    from common.report import environment_report

    environment_report()
    return 0


def cmd_seminar(args: argparse.Namespace) -> int:
    """Execute a week's seminar headless and print where the notebook is and its key results."""
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from common import notebooks
    from common.environment import device_name

    week = get_week(args.week)
    if not week.has_seminar:
        raise EffdlError(f"{week.name} ({week.title}) has no seminar yet: it is planned, not written")
    small = args.small if args.small is not None else not torch.cuda.is_available()
    if args.record and small and not week.awaiting_gpu_recording:
        raise EffdlError(
            f"--record stores {week.full_run} in the committed notebook; use it with --full {week.full_run_place}"
        )
    console = Console()
    mode = "small" if small else "full"
    notes = []
    if not small and not torch.cuda.is_available() and not week.full_on_cpu:
        notes.append(
            "full sizes on a CPU: meant for a GPU, this can take very long, and timings compare nothing"
        )
        console.print(f"warning: {notes[-1]}", markup=False)
    console.print(f"Running {week.name} seminar ({mode} sizes, device: {device_name()})")
    load_before = machine_load()
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("code cells", total=None)
        run = notebooks.execute(
            week,
            small=small,
            out_dir=Path(args.out),
            timeout_s=args.timeout,
            on_cell_done=lambda done, total: progress.update(task, completed=done, total=total),
        )
    console.print(f"Executed notebook: {run.path.resolve()}  ({run.duration_s:.1f} s)", soft_wrap=True)
    if args.record:
        console.print(f"Recorded into {notebooks.record(run).relative_to(REPO_ROOT)}")
    # A full run of a week meant for a CPU loads the cores with its own ranks (week 4: 4 of them), so the load
    # after it says nothing about other work: only the load before it does.
    load = load_before if week.full_on_cpu and not small else max(load_before, machine_load())
    if load > (os.cpu_count() or 1):
        notes.append(
            f"the machine was busy (load average {load:.1f} on {os.cpu_count()} cores): timings are off"
        )
    if run.summary:
        console.rule("key results")
        console.print(run.summary, markup=False, highlight=False, soft_wrap=True)
        for note in notes:
            console.print(f"note: {note}", markup=False, soft_wrap=True)
    return 0


def machine_load() -> float:
    """The 1-minute load average: above the core count, other work competed with what was timed."""
    return os.getloadavg()[0]


def cmd_slides(args: argparse.Namespace) -> int:
    """Build lecture slides to one offline HTML file per week (and a PDF with --pdf)."""
    from common import slides
    from common.weeks import weeks_with_slides

    weeks = [get_week(args.week)] if args.week else weeks_with_slides()
    for week in weeks:
        built = slides.build(week, Path(args.out), pdf=args.pdf)
        pdf_note = f", {built.pdf}" if built.pdf else ""
        print(f"{week.name}: {built.n_slides} slides -> {built.html}{pdf_note}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Check that every seminar (small sizes), every slide deck and every grader self-test works here."""
    from common.check import check_course

    return check_course(Path(args.out) if args.out else None)


def cmd_selftest(args: argparse.Namespace) -> int:
    """Prove an assignment's grader: the reference scores full marks, the starter 0, every mutant loses points."""
    from common.grading.manifest import find_assignment
    from common.grading.selftest import selftest

    verdicts = selftest(
        find_assignment(args.assignment),
        jobs=args.jobs,
        only_gpu_tasks=args.gpu_only,
        mutants_on_targets_only=args.targets_only,
    )
    return 0 if all(v.ok for v in verdicts) else 1


def cmd_grade(args: argparse.Namespace) -> int:
    """Grade submissions (folders or zips) with an assignment's hidden tests; write results and a gradebook."""
    from common.grading.grade import grade
    from common.grading.manifest import find_assignment
    from common.grading.shard import Shard

    gpus = None if args.gpus is None else [int(g) for g in args.gpus.split(",") if g.strip()]
    shard = Shard.parse(args.shard) if args.shard else None
    assignment = find_assignment(args.assignment)
    paths = [Path(p) for p in args.submissions]
    grade(assignment, paths, Path(args.out), args.jobs, gpus, shard=shard, sandboxed=not args.no_sandbox)
    return 0


def cmd_gradebook_merge(args: argparse.Namespace) -> int:
    """Merge the outputs of `effdl grade --shard K/N` (one folder per shard) into one gradebook."""
    from common.grading.shard import merge_gradebooks

    folders = [Path(folder) for folder in args.folders]
    out = Path(args.out) if args.out else folders[0].parent / "gradebook.csv"
    print(f"merged {len(folders)} shard(s) into {merge_gradebooks(folders, out)}")
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    """Build the student repository: solutions stubbed, graders left out, a student README, fresh history."""
    from common.grading.release import build_release

    report = build_release(Path(args.out))
    print(f"Released {report.files} files to {report.out_dir} ({report.stubs} solution blocks stubbed).")
    for name, count in report.public_tests.items():
        failure = report.public_failures.get(name, "NotImplementedError")
        print(f"  {name}: {count} public tests, each failing with {failure} as it must")
    return 0


def _report_saved(paths: list[Path]) -> int:
    """Print where a benchmark saved its results; the command's exit status."""
    print("\n".join(f"saved {path}" for path in paths))
    return 0


def cmd_bench_timers(args: argparse.Namespace) -> int:
    """Check common.bench against triton.testing on this GPU and save the figures as JSON."""
    from common.bench_validation import run_timer_validation

    report = run_timer_validation(results_dir(args.out))
    for check in report["checks"]:
        print(
            f"{check['name']}: common.bench {check['ours_ms']:.4f} ms vs {check['reference']} "
            f"{check['reference_ms']:.4f} ms ({100 * check['rel_diff']:+.2f}%, "
            f"{'within' if check['within_tolerance'] else 'OUTSIDE'} 3%)"
        )
    print(f"saved to {report['path']}")
    return 0 if all(check["within_tolerance"] for check in report["checks"]) else 1


def cmd_bench_kernels(args: argparse.Namespace) -> int:
    """Benchmark the Triton kernels against PyTorch on this GPU; save JSON and one plot per kernel."""
    from common.kernels.benchmark import run_kernel_benchmarks

    try:
        paths = run_kernel_benchmarks(results_dir(args.out), kernels=args.kernel, quick=args.quick)
    except ValueError as error:  # an unknown kernel name: the message lists the valid ones
        raise EffdlError(str(error)) from None
    return _report_saved(paths)


def cmd_bench_pipelines(args: argparse.Namespace) -> int:
    """Week-3 benchmarks on this GPU: autocast training step, GPU JPEG decoding, fp8 GEMM."""
    from common.bench_pipelines import run_pipeline_benchmarks

    paths = run_pipeline_benchmarks(results_dir(args.out), quick=args.quick)
    return _report_saved(paths)


def cmd_bench_allreduce(args: argparse.Namespace) -> int:
    """Week 4: gloo's and our all-reduces from 64 KiB to 256 MiB on 2 and 4 CPU ranks, against the fitted model."""
    from common.distributed.benchmark import run_all_reduce_benchmark

    paths = run_all_reduce_benchmark(results_dir(args.out), quick=args.quick)
    return _report_saved(paths)


def cmd_bench_ddp(args: argparse.Namespace) -> int:
    """Week 4: step time of our DDP (common.distributed.ddp) against torch DDP on CPU ranks (gloo)."""
    from common.distributed.benchmark import run_ddp_benchmark

    paths = run_ddp_benchmark(results_dir(args.out), quick=args.quick, world=args.ranks)
    return _report_saved(paths)


def cmd_bench_sharded_memory(args: argparse.Namespace) -> int:
    """Week 6: per-rank peak memory of DDP, ZeRO-1, ZeRO-2 and FSDP2, predicted and measured on 2 and 4 CPU ranks."""
    from common.memory.sharded import run_sharded_memory_benchmark

    return _report_saved(run_sharded_memory_benchmark(results_dir(args.out)))


def cmd_bench_large_models(args: argparse.Namespace) -> int:
    """Week 5: memory predictor, checkpointing, offloading and the Triton path of the Llama model on this GPU."""
    from common.memory.benchmark import run_large_model_benchmarks

    paths = run_large_model_benchmarks(results_dir(args.out), quick=args.quick)
    return _report_saved(paths)


def cmd_bench_serving(args: argparse.Namespace) -> int:
    """Week 7: the classifier service at batch size 1 against dynamic batching under 64 concurrent clients."""
    from week07_application_deployment.benchmark import run_serving_benchmark

    paths = run_serving_benchmark(results_dir(args.out), quick=args.quick, concurrency=args.clients)
    return _report_saved(paths)


def cmd_bench_quantization(args: argparse.Namespace) -> int:
    """Week 9: error and batch-1 decode tokens/s of int8, int4, fp8 and SmoothQuant against bf16 on this GPU."""
    from common.inference.quantization_benchmark import run_quantization_benchmark

    paths = run_quantization_benchmark(results_dir(args.out), quick=args.quick)
    return _report_saved(paths)


def cmd_bench_speculative(args: argparse.Namespace) -> int:
    """Week 9: greedy speculative decoding against plain greedy decoding, tokens/s on this GPU, per draft length."""
    from common.inference.speculative_benchmark import run_speculative_benchmark

    paths = run_speculative_benchmark(results_dir(args.out), quick=args.quick)
    return _report_saved(paths)


def cmd_wheelhouse(args: argparse.Namespace) -> int:
    """Download the wheels uv.lock pins for an offline Linux runner (a cluster's GPU node), sha256-checked."""
    from common import wheelhouse

    wheels = wheelhouse.plan(REPO_ROOT / "uv.lock", args.python, args.glibc, args.skip or ())
    total_mb = sum(w.size for w in wheels) / 2**20
    print(
        f"{len(wheels)} wheels for CPython {args.python}, Linux x86_64, glibc {args.glibc}: {total_mb:,.0f} MiB"
    )
    if args.dry_run:
        print("\n".join(f"  {w.filename}  {w.size / 2**20:,.1f} MiB" for w in wheels))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, wheel in enumerate(wheels, 1):
        path = wheelhouse.download(wheel, out)  # a source archive comes back built into a wheel
        print(f"[{i}/{len(wheels)}] {path.name}  {wheel.size / 2**20:,.1f} MiB", flush=True)
    requirements = wheelhouse.write_requirements(wheels, out)
    print(f"wrote {requirements}; on the runner, with no index:\n"
          f"  pip install --no-index --no-deps --find-links {out} -r {requirements}")  # fmt: skip
    return 0


def ensure_slide_tool() -> None:
    """Install the pinned Marp CLI from package-lock.json if it is missing."""
    from common.slides import MARP

    if MARP.exists():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise MissingDependencyError("the slide tests need Node.js and npm: install them, then run `npm ci`")
    print("Installing the slide tool (npm ci) ...", flush=True)
    subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=REPO_ROOT, check=True)


def test_command(extra: list[str]) -> list[str]:
    """The whole test suite: the repository's tests plus every seminar notebook under nbval, small sizes."""
    notebooks = sorted(str(path.relative_to(REPO_ROOT)) for path in REPO_ROOT.glob("week*/seminar.ipynb"))
    return [
        sys.executable, "-m", "pytest",
        "-n", "auto", "--dist", "loadfile",  # nbval needs a notebook's cells on one worker
        "--nbval-lax", "--nbval-current-env",
        "--durations=25",  # the slowest tests, printed at the end: where the suite's time goes
        "tests", *notebooks, *extra,
    ]  # fmt: skip


def cmd_test(args: argparse.Namespace) -> int:
    """Set up what the tests need (the slide tool) and run the whole test suite with small sizes."""
    ensure_slide_tool()
    # `-n auto` runs one worker per core. One intra-op thread per process, the notebooks' kernels and the
    # workers' children included, keeps them from fighting over the cores (the workers set it for themselves).
    env = {**os.environ, "EFFDL_SMALL": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.call(test_command(args.pytest_args), cwd=REPO_ROOT, env=env)


def _add_command(
    subparsers: argparse._SubParsersAction,
    name: str,
    handler: Callable[[argparse.Namespace], int],
    epilog: str | None = None,
) -> argparse.ArgumentParser:
    """A subcommand whose help and description are its handler's docstring."""
    command = subparsers.add_parser(
        name,
        help=handler.__doc__,
        description=handler.__doc__,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    command.set_defaults(handler=handler)
    return command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="effdl",
        description="Efficient Deep Learning Systems: run seminars, build slides, check the course.",
        epilog=MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_command(sub, "env", cmd_env)

    seminar = _add_command(
        sub,
        "seminar",
        cmd_seminar,
        epilog="examples:\n  effdl seminar week01_intro\n  effdl seminar 1 --small --out /tmp/run\n"
        "  effdl seminar week01_intro --full --record     (on a GPU: refresh the committed notebook)",
    )
    seminar.add_argument("week", help="week folder name, e.g. week01_intro (or 1, 01, week01)")
    size = seminar.add_mutually_exclusive_group()
    size.add_argument(
        "--small", dest="small", action="store_true", default=None, help="small sizes (default on CPU)"
    )
    size.add_argument("--full", dest="small", action="store_false", help="full sizes (default on a GPU)")
    seminar.add_argument(
        "--out", default=str(DEFAULT_BUILD_DIR / "seminars"), help="folder for the executed notebook"
    )
    seminar.add_argument(
        "--record",
        action="store_true",
        help="store the outputs in the committed seminar.ipynb (full runs only: on a GPU, or on a CPU for "
        "the weeks whose full size is a CPU run, common.weeks.FULL_ON_CPU)",
    )
    seminar.add_argument("--timeout", type=int, default=1800, help="seconds one cell may run (default 1800)")

    slides = _add_command(
        sub,
        "slides",
        cmd_slides,
        epilog="examples:\n  effdl slides                    every week's deck\n  effdl slides week01_intro --pdf",
    )
    slides.add_argument("week", nargs="?", help="one week (default: every week that has slides)")
    slides.add_argument("--pdf", action="store_true", help="also write a PDF (needs Chromium)")
    slides.add_argument("--out", default=str(DEFAULT_BUILD_DIR / "slides"), help="output folder")

    check = _add_command(sub, "check", cmd_check)
    check.add_argument("--out", help="keep the outputs here (default: a temporary folder)")

    grade = _add_command(
        sub,
        "grade",
        cmd_grade,
        epilog="examples:\n"
        "  effdl grade week03_fast_pipelines submissions/             every zip or folder in submissions/\n"
        "  effdl grade week03 alice.zip bob/ --out grades --jobs 4 --gpus 0,1,2,3\n"
        "  effdl grade week03 subs/ --shard 2/8 --out grades/shard-2     slice 2 of 8, e.g. one Slurm array task\n\n"
        "Writes OUT/<submission>/results.json (Gradescope format), OUT/<submission>/grader.log (for TAs)\n"
        "and OUT/gradebook.csv. Tasks that need a GPU show `needs GPU runner` on a machine without one.\n"
        "Submissions run in a bubblewrap sandbox (apt-get install bubblewrap); without it grading stops,\n"
        "unless --no-sandbox is given (every report then says UNSANDBOXED).",
    )
    grade.add_argument("assignment", help="assignment folder name under assignments/ (or a unique prefix)")
    grade.add_argument("submissions", nargs="+", help="zips or folders, or a folder of them")
    grade.add_argument("--out", default=str(DEFAULT_BUILD_DIR / "grades"), help="output folder")
    grade.add_argument("--jobs", type=int, default=1, help="submissions graded in parallel (default 1)")
    grade.add_argument("--gpus", help="comma-separated GPU indices to use (default: every visible GPU)")
    grade.add_argument(
        "--shard",
        metavar="K/N",
        help="grade slice K of N of the batch (a cluster array task); see gradebook merge",
    )
    grade.add_argument(
        "--no-sandbox",
        action="store_true",
        help="run submissions WITHOUT isolation where bubblewrap cannot run (every report says so)",
    )

    gradebook = sub.add_parser("gradebook", help="gradebooks of sharded grading runs")
    gradebook_sub = gradebook.add_subparsers(dest="action", required=True, metavar="ACTION")
    merge = _add_command(
        gradebook_sub,
        "merge",
        cmd_gradebook_merge,
        epilog="example (after `effdl grade week03 subs/ --shard K/4 --out grades/shard-K` for K = 1..4):\n"
        "  effdl gradebook merge grades/shard-* --out grades/gradebook.csv",
    )
    merge.add_argument("folders", nargs="+", help="the --out folders of the shards")
    merge.add_argument("--out", help="the merged gradebook (default: gradebook.csv beside the first folder)")

    selftest = _add_command(
        sub,
        "selftest",
        cmd_selftest,
        epilog="example:\n  effdl selftest week03_fast_pipelines --jobs 2",
    )
    selftest.add_argument("assignment", help="assignment folder name under assignments/ (or a unique prefix)")
    selftest.add_argument("--jobs", type=int, default=2, help="variants graded in parallel (default 2)")
    selftest.add_argument("--gpu-only", action="store_true", help="check only the tasks that need a GPU")
    selftest.add_argument(
        "--targets-only",
        action="store_true",
        help="grade each mutant only on the tasks it targets (faster; skips checking that it keeps the others)",
    )

    release = _add_command(
        sub,
        "release",
        cmd_release,
        epilog="example:\n  effdl release --out ../effdl-student",
    )
    release.add_argument("--out", default=str(DEFAULT_BUILD_DIR / "release"), help="new or empty folder")

    wheels = _add_command(
        sub,
        "wheelhouse",
        cmd_wheelhouse,
        epilog="examples:\n"
        "  effdl wheelhouse --out wheels --python 3.12\n"
        "  effdl wheelhouse --out wheels --python 3.12 --skip torch --skip triton --skip 'nvidia-*' --skip 'cuda-*'\n"
        "  effdl wheelhouse --python 3.11 --dry-run          list the files and their size, download nothing\n\n"
        'Offline runners: README.md, "GPU runners without internet".',
    )
    wheels.add_argument("--out", default=str(DEFAULT_BUILD_DIR / "wheelhouse"), help="folder for the wheels")
    wheels.add_argument(
        "--python", default="3.12", help="the runner's CPython, 3.12 or 3.12.3 (default 3.12)"
    )
    wheels.add_argument(
        "--glibc", default="2.28", help="the runner's glibc version (default 2.28, as torch needs)"
    )
    wheels.add_argument(
        "--skip", action="append", help="a package (or pattern) the runner already has; repeatable"
    )
    wheels.add_argument("--dry-run", action="store_true", help="list the wheels and their size only")

    bench = sub.add_parser("bench", help="benchmarks whose results the READMEs quote")
    bench_sub = bench.add_subparsers(dest="suite", required=True, metavar="SUITE")
    timers = _add_command(bench_sub, "timers", cmd_bench_timers)
    timers.add_argument("--out", help=OUT_HELP)
    kernels = _add_command(
        bench_sub,
        "kernels",
        cmd_bench_kernels,
        epilog="examples:\n  effdl bench kernels\n  effdl bench kernels --kernel matmul --kernel softmax --quick",
    )
    kernels.add_argument("--kernel", action="append", help="one kernel (repeatable; default: all)")
    kernels.add_argument("--quick", action="store_true", help="a short sweep, to check that everything runs")
    kernels.add_argument("--out", help=OUT_HELP)
    pipelines = _add_command(
        bench_sub, "pipelines", cmd_bench_pipelines, epilog="example:\n  effdl bench pipelines"
    )
    pipelines.add_argument("--quick", action="store_true", help="small sizes, to check that everything runs")
    pipelines.add_argument("--out", help=OUT_HELP)
    allreduce = _add_command(
        bench_sub, "allreduce", cmd_bench_allreduce, epilog="example:\n  effdl bench allreduce --quick"
    )
    allreduce.add_argument("--quick", action="store_true", help="two sizes, to check that everything runs")
    allreduce.add_argument("--out", help=OUT_HELP)
    ddp = _add_command(bench_sub, "ddp", cmd_bench_ddp, epilog="example:\n  effdl bench ddp --ranks 4")
    ddp.add_argument("--ranks", type=int, default=4, help="number of CPU ranks (default 4)")
    ddp.add_argument("--quick", action="store_true", help="a tiny model, to check that everything runs")
    ddp.add_argument("--out", help=OUT_HELP)
    sharded = _add_command(
        bench_sub, "sharded-memory", cmd_bench_sharded_memory, epilog="example:\n  effdl bench sharded-memory"
    )
    sharded.add_argument("--out", help=OUT_HELP)
    large = _add_command(
        bench_sub, "large-models", cmd_bench_large_models, epilog="example:\n  effdl bench large-models"
    )
    large.add_argument("--quick", action="store_true", help="the toy model, to check that everything runs")
    large.add_argument("--out", help=OUT_HELP)
    serving = _add_command(
        bench_sub,
        "serving",
        cmd_bench_serving,
        epilog="examples:\n  effdl bench serving\n  effdl bench serving --quick --clients 8",
    )
    serving.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    serving.add_argument("--quick", action="store_true", help="a tiny model and 2 s per setting")
    serving.add_argument("--out", help=OUT_HELP)
    for name, handler in (("quantization", cmd_bench_quantization), ("speculative", cmd_bench_speculative)):
        week9 = _add_command(
            bench_sub,
            name,
            handler,
            epilog=f"examples:\n  effdl bench {name}\n  effdl bench {name} --quick      tiny models, runs on a CPU",
        )
        week9.add_argument(
            "--quick",
            action="store_true",
            help="tiny models and short timings, to check that everything runs",
        )
        week9.add_argument("--out", help=OUT_HELP)

    test = _add_command(
        sub,
        "test",
        cmd_test,
        epilog="extra arguments go to pytest, e.g.:\n  effdl test -k bench\n  effdl test -x -q",
    )
    test.add_argument("pytest_args", nargs="*", help="passed to pytest (options too)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command == "test":  # everything effdl does not know goes to pytest, options included
        args.pytest_args = [*unknown, *args.pytest_args]
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.handler(args)
    except EffdlError as error:
        print(f"effdl: error: {error}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:
        if (error.name or "").partition(".")[0] not in COURSE_PACKAGES:
            raise  # not a package `uv sync` installs: an import bug, whose traceback says where
        print(
            f"effdl: error: the Python package {error.name!r} is missing; "
            "run `uv sync` in the repository root, or start commands with `uv run`",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("effdl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
