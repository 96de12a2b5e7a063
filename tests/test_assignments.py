"""Every assignment's grader is proven (`effdl selftest`). The student release is tested in test_release.py."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from rich.console import Console

from common.grading.manifest import assignment_names, find_assignment
from common.grading.selftest import selftest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the grading sandbox runs on Linux"
)
ASSIGNMENTS = assignment_names()


def _verdicts_ok(verdicts) -> None:
    wrong = {v.variant: v.problems for v in verdicts if not v.ok}
    assert not wrong, wrong


@pytest.mark.slow
@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_selftest_on_cpu(name: str) -> None:
    """Each mutant graded on the tasks it targets only (`effdl selftest` grades it on every task)."""
    assignment = find_assignment(name)
    verdicts = selftest(assignment, jobs=2, console=Console(quiet=True), mutants_on_targets_only=True)
    _verdicts_ok(verdicts)
    assert {v.variant for v in verdicts} >= {"reference", "starter"}
    assert len(verdicts) - 2 == len(assignment.mutants), "every mutant must be tried"
    targets = {m.name: set(m.targets) for m in assignment.mutants}
    for verdict in verdicts:
        graded = {t.task.id for t in verdict.result.tasks}
        expected = targets.get(verdict.variant, {t.id for t in assignment.tasks})
        assert graded == expected, f"{verdict.variant} graded on {graded}, not {expected}"


@pytest.mark.gpu
@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_selftest_of_gpu_tasks(name: str) -> None:
    assignment = find_assignment(name)
    if not any(task.gpus for task in assignment.tasks):
        pytest.skip(f"{name} has no GPU task")
    needed, have = max(task.gpus for task in assignment.tasks), torch.cuda.device_count()
    if have < needed:
        pytest.skip(f"{name} has a task for {needed} GPUs; this machine has {have}")
    verdicts = selftest(assignment, jobs=1, only_gpu_tasks=True, console=Console(quiet=True))
    _verdicts_ok(verdicts)
    graded = [t for v in verdicts for t in v.result.tasks if t.task.gpus]
    assert graded and all(t.status == "graded" for t in graded), [
        (t.task.id, t.status, t.detail) for t in graded
    ]


def test_gpu_only_selftest_without_enough_gpus_stops_with_one_line() -> None:
    """A TA checking a runner must not be told "ok" when no GPU task ran (issue: every task "infra", exit 0)."""
    from common.grading.harness import GraderSetupError

    name = next(n for n in ASSIGNMENTS if any(t.gpus for t in find_assignment(n).tasks))
    with pytest.raises(GraderSetupError, match=r"GPU tasks need up to \d GPU\(s\) and this machine has none"):
        selftest(find_assignment(name), gpus=[], only_gpu_tasks=True, console=Console(quiet=True))


def test_a_task_the_selftest_could_not_score_is_a_problem() -> None:
    """An infrastructure error proves nothing about the grader; a GPU task left to a runner is fine on a CPU
    but not when the GPU tasks are what the self-test was asked to check."""
    from common.grading.batch import SubmissionResult
    from common.grading.harness import TaskResult
    from common.grading.manifest import Task
    from common.grading.selftest import _unscored

    cpu, gpu = Task("cpu_task", "", 1.0, ("t",)), Task("gpu_task", "", 1.0, ("t",), gpus=1)
    result = SubmissionResult(submission=None, tasks=[
        TaskResult(cpu, "infrastructure error", None, detail="the sandbox died"),
        TaskResult(gpu, "needs GPU runner", None, detail="needs 1 GPU(s); this machine has none"),
    ])  # fmt: skip
    assert _unscored(result, only_gpu_tasks=False) == ["cpu_task: infrastructure error (the sandbox died)"]
    assert len(_unscored(result, only_gpu_tasks=True)) == 2
    result.tasks[0] = TaskResult(cpu, "graded", 1.0)
    assert _unscored(result, only_gpu_tasks=False) == []


def _week02_planted():
    """The week-2 grader's trusted module (it lives beside the hidden tests, not in a package)."""
    path = find_assignment("week02_management_and_testing").hidden_tests / "planted.py"
    spec = importlib.util.spec_from_file_location("week02_planted", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_the_source_scan_flags_reading_the_code_but_not_ordinary_tests() -> None:
    suspicious = _week02_planted().suspicious
    ordinary = (
        '"""Tests of ddpm2d/train.py."""\n'
        "import torch\n"
        "def test_eval_mode():\n"
        '    """The model from train.py, in eval mode."""\n'
        "    model = torch.compile(torch.nn.Linear(2, 2))\n"
        "    model.eval()\n"
    )
    assert suspicious(ordinary) == []
    reading = (
        "import sys, importlib\n"
        "def test_x():\n"
        "    eval('1')\n"
        "    text = open('ddpm2d/train.py').read()\n"
        "    sys.exit(0)\n"
    )
    assert suspicious(reading) == ["'.py'", "eval", "exit", "importlib"]


def _load(path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _hidden_checker(monkeypatch: pytest.MonkeyPatch, assignment: str, scenario: str, checker: str) -> tuple:
    """(the checker module, its scenario module): a hidden test file loaded here, with the `scenarios.<name>`
    import it makes resolved to the assignment's scenario, so that its verdicts can be tested directly."""
    import types

    hidden = find_assignment(assignment).hidden_tests
    scenario_module = _load(hidden / "scenarios" / f"{scenario}.py", f"{assignment}_{scenario}_scenario")
    package = types.ModuleType("scenarios")
    setattr(package, scenario, scenario_module)
    monkeypatch.setitem(sys.modules, "scenarios", package)
    monkeypatch.setitem(sys.modules, f"scenarios.{scenario}", scenario_module)
    return _load(hidden / checker, f"{assignment}_{scenario}_checker"), scenario_module


def test_week05_offload_grader_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The week-5 offload task is graded on a GPU only; its checker's arithmetic is checked here on the CPU: the
    reference solution, run by the task's scenario on device "cpu" at small sizes, matches the checker's float64
    reference, and a solution that overwrites .grad instead of adding to it does not; the memory verdict, on
    figures as the allocator reports them, passes a step within the budget that used the GPU and nothing else."""
    checker, scenario = _hidden_checker(
        monkeypatch, "week05_large_models", "offload", "test_offload_hidden.py"
    )
    monkeypatch.syspath_prepend(str(find_assignment("week05_large_models").root / "src"))
    try:
        ref = checker.reference(scenario.make(0, 32, 3, 4))
        seen = scenario.train(0, [32, 3, 4], 0, checker.SEED, on_gpu=False)
        assert seen["on_cpu"] == [True] * 3 and seen["out_device"] == "cpu"
        checker.close(seen["out"], ref["out"], "the output")
        for i in range(3):
            for key in ("bias", "rows", "columns"):
                checker.close(seen[key][i], ref[key][i], f"layer {i}: {key}")
        from largemodels import offload

        original = offload.offloaded_step

        def overwrites(layers, x, grad, device):  # what the mutant offload_gradient_overwritten does
            for layer in layers:
                for p in layer.parameters():
                    p.grad = None
            return original(layers, x, grad, device)

        monkeypatch.setattr(offload, "offloaded_step", overwrites)
        wrong = scenario.train(0, [32, 3, 4], 0, checker.SEED, on_gpu=False)
        with pytest.raises(AssertionError):
            checker.close(wrong["bias"][0], ref["bias"][0], "layer 0: bias")
    finally:
        for name in [n for n in sys.modules if n == "largemodels" or n.startswith("largemodels.")]:
            del sys.modules[name]
    mib, weights = 2**20, 512 * 2**20

    def stats(peak: int, allocated: int) -> dict[str, int]:  # what step_memory reads of memory_stats
        return {"reserved_bytes.all.peak": peak, "allocated_bytes.all.allocated": allocated}

    memory = scenario.step_memory(stats(0, 10 * mib), stats(300 * mib, 10 * mib + 1536 * mib))
    assert memory == {"peak_reserved": 300 * mib, "allocated": 1536 * mib}
    checker.check_memory(memory, 384 * mib, weights)
    for wrong_memory, why in [
        ({"peak_reserved": 385 * mib, "allocated": 1536 * mib}, "budget is 384 MiB"),  # every layer kept
        ({"peak_reserved": 2 * mib, "allocated": 0}, "compute on `device`"),  # the step ran on the CPU
        (None, "could not be read"),
    ]:
        with pytest.raises(AssertionError, match=why):
            checker.check_memory(wrong_memory, 384 * mib, weights)


def test_week09_speculative_speed_models_keep_most_proposals() -> None:
    """The week-9 GPU task asks speculative decoding to be 1.5x faster than plain decoding, with a 2-layer draft
    made of a 16-layer target's first layers. That bar holds only if the target keeps most proposals: with
    draft_len 4 and a round costing about 1.5 target forwards (launch-bound: 4 draft forwards of 2 layers),
    1.5x needs > 2.25 tokens per round. Measured here on the CPU with the course's speculative decoding, the
    same models in float32."""
    from common.inference.speculative import speculative_generate

    hidden = find_assignment("week09_inference_algorithms").hidden_tests
    scenario = _load(hidden / "scenarios" / "speculative.py", "week09_speculative_scenario")
    target, draft = scenario.speed_models(5, "cpu")
    prompt = torch.arange(100, 116)[None]
    _, stats = speculative_generate(target, draft, prompt, 24, draft_len=4)
    assert stats.tokens_per_round > 3.0, (stats.acceptance_rate, stats.tokens_per_round)


WEEK09_HOPPER_COMPILE = """
import sys
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile

sys.path.insert(0, sys.argv[1])
from fastinfer import quantize, w8a8

hopper = GPUTarget("cuda", 90, 32)
aligned = {(i,): [["tt.divisibility", 16]] for i in range(11)}  # what a launch with aligned tensors specialises
kernel = quantize._quantize_rows_kernel
signature = {"x_ptr": "*bf16", "q_ptr": "*i8", "scale_ptr": "*fp32", "M": "i32", "K": "i32", "stride_xm": "i32"}
constexprs = {"BLOCK_M": 4, "BLOCK_K": 1024}
compile(ASTSource(kernel, {**signature, **dict.fromkeys(constexprs, "constexpr")}, constexprs), target=hopper)
config = w8a8.GPU_CONFIGS[0]
constexprs = {**config.kwargs, "EVEN_K": True}
signature = {"x_ptr": "*i8", "w_ptr": "*i8", "x_scale_ptr": "*fp32", "w_scale_ptr": "*fp32", "y_ptr": "*bf16"}
signature.update(dict.fromkeys(["M", "N", "K", "stride_xm", "stride_wn", "stride_ym"], "i32"))
signature.update(dict.fromkeys(constexprs, "constexpr"))
source = ASTSource(w8a8._w8a8_kernel.fn.fn, signature, constexprs, attrs=aligned)
compiled = compile(source, target=hopper, options={"num_warps": config.num_warps, "num_stages": config.num_stages})
ptx = compiled.asm["ptx"]
print("wgmma.mma_async.sync.aligned" in ptx and ".s8.s8" in ptx, "cp.async" in ptx, compiled.metadata.shared)
config = w8a8.TMA_CONFIGS[0]  # the Hopper path: host-made descriptors of the config's tiles
constexprs = {**config.kwargs, "NUM_SMS": 132}
bm, bn, bk = (config.kwargs[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
signature = {"x_desc": f"tensordesc<i8[{bm}, {bk}]>", "w_desc": f"tensordesc<i8[{bn}, {bk}]>"}
signature.update({"x_scale_ptr": "*fp32", "w_scale_ptr": "*fp32", "y_ptr": "*bf16"})
signature.update(dict.fromkeys(["M", "N", "K", "stride_ym"], "i32"))
signature.update(dict.fromkeys(constexprs, "constexpr"))
source = ASTSource(w8a8._w8a8_tma_kernel.fn, signature, constexprs)
compiled = compile(source, target=hopper, options={"num_warps": config.num_warps, "num_stages": config.num_stages})
ptx = compiled.asm["ptx"]
print("wgmma.mma_async.sync.aligned" in ptx and ".s8.s8" in ptx, "cp.async.bulk.tensor" in ptx, compiled.metadata.shared)
"""


def test_week09_reference_kernels_compile_for_hopper_with_int8_wgmma_and_a_pipeline() -> None:
    """The week-9 reference kernels are graded on a GPU only for speed; the CPU tasks run them in Triton's
    interpreter, which accepts code the compiler refuses (a plain global int read in a kernel). Compiled here
    for sm_90 without a GPU (Triton's own ptxas): all three compile, the W8A8 GEMMs' dots are int8 wgmma, the
    portable kernel's largest config keeps its 3 stages of operands in flight (cp.async into shared memory),
    and the Hopper kernel's first config loads its tiles with the TMA in 4 stages within the 227 KB."""
    import os
    import subprocess

    src = find_assignment("week09_inference_algorithms").src
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # compile, whatever this machine has
    run = subprocess.run(
        [sys.executable, "-c", WEEK09_HOPPER_COMPILE, str(src)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    int8_wgmma, pipelined, shared, tma_wgmma, tma_loads, tma_shared = run.stdout.split()
    assert int8_wgmma == "True" and pipelined == "True", run.stdout
    assert int(shared) == 3 * (128 * 128 + 128 * 256), (
        "3 stages of a 128x128 int8 slab of x and a 128x256 of w"
    )
    assert tma_wgmma == "True" and tma_loads == "True", run.stdout
    # 4 stages of 128x128 and 256x128 int8 tiles, plus the epilogue's scratch, within an H100's 227 KB.
    assert 4 * (128 * 128 + 256 * 128) <= int(tma_shared) <= 227 * 1024, run.stdout


@pytest.mark.gpu
def test_week09_hopper_w8a8_path_at_ragged_tiles_gives_the_exact_product(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On Hopper the W8A8 reference takes its TMA kernel wherever rows are 16-byte aligned, whatever the tiles:
    edge tiles in M and N, and a K that the 128-wide K tiles do not divide (the TMA fills past the edge with
    zeros), give the exact product to one bf16 ulp (2^-7 relative; the sums are exact in int32)."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the TMA path needs a Hopper (sm_90) or newer GPU")
    assignment = find_assignment("week09_inference_algorithms")
    monkeypatch.syspath_prepend(str(assignment.src))
    from fastinfer.w8a8 import tma_applies, w8a8_matmul

    checker = _load(assignment.hidden_tests / "int8_reference.py", "week09_int8_reference")

    generator = torch.Generator().manual_seed(0)
    for m, n, k in ((37, 45, 272), (300, 520, 4112)):
        x_q = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=generator).cuda()
        w_q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=generator).cuda()
        x_scale, w_scale = (torch.rand(size, generator=generator).cuda() / 100 for size in (m, n))
        assert tma_applies(x_q, w_q), (m, n, k)
        y = w8a8_matmul(x_q, x_scale, w_q, w_scale, out_dtype=torch.bfloat16)
        exact = checker.w8a8_exact(x_q, x_scale, w_q, w_scale)
        torch.testing.assert_close(y.double(), exact, rtol=2**-7, atol=0, msg=f"{m}x{n}x{k}")


def test_week06_overlap_verdict_on_synthetic_traces(monkeypatch: pytest.MonkeyPatch) -> None:
    """The week-6 overlap task is graded on 2 GPUs only; its verdict is checked here on traces written out by
    hand in the profiler's format: every recorded forward and backward with a prefetched gather beside
    compute passes; gathers the compute waits for (one stream, one after another) fail in every phase; a
    phase without any all-gather kernel, or one half covered by a hair less than the threshold, is named."""
    checker, scenario = _hidden_checker(monkeypatch, "week06_fsdp", "fsdp", "test_overlap_gpu_hidden.py")
    gather, gemm, nccl, compute = "ncclDevKernel_AllGather_RING_LL(x)", "sm90_xmma_gemm_bf16", 20, 7

    def kernel(name: str, stream: int, start: float, end: float) -> dict:
        return {"ph": "X", "cat": "kernel", "name": name, "ts": start, "dur": end - start,
                "args": {"stream": stream}}  # fmt: skip

    def trace(gather_stream: int, gather_at: float, covered_until: float, phases: tuple[str, ...]) -> dict:
        """Per recorded step and phase a 1000 us range: a gather of 100 us from gather_at, a compute kernel
        from 0 to covered_until (then one from gather_at + 100 on)."""
        events, t = [], 0.0
        for k in range(checker.STEPS):
            for phase in scenario.PHASES:
                events.append(
                    {"ph": "X", "cat": "user_annotation", "name": f"{phase}#{k}", "ts": t, "dur": 1000}
                )
                if phase in phases:
                    events.append(kernel(gather, gather_stream, t + gather_at, t + gather_at + 100))
                events += [
                    kernel(gemm, compute, t, t + covered_until),
                    kernel(gemm, compute, t + 300, t + 900),
                ]
                t += 1000
        return {"traceEvents": events}

    assert checker.gathers_without_overlap(trace(nccl, 100, 180, scenario.PHASES)) == []  # 80% covered
    serial = checker.gathers_without_overlap(trace(compute, 100, 100, scenario.PHASES))
    assert len(serial) == 2 * checker.STEPS and all("(the best: 0%)" in p for p in serial), serial
    assert len(checker.gathers_without_overlap(trace(nccl, 100, 149, scenario.PHASES))) == 2 * checker.STEPS
    missing = checker.gathers_without_overlap(trace(nccl, 100, 180, ("forward",)))
    assert missing == [
        f"no NCCL all-gather kernel in the backward of recorded step {k}" for k in range(checker.STEPS)
    ]
