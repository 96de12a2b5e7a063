"""How a hidden test reaches the submission: the `submission` fixture, calls that return data.

The hidden tests run in the trusted checker and never import the submission. They call it:

    bins = submission.call("fastpipe.batching:first_fit_decreasing", sizes, 10, returns=list[list[int]])
    scaler = submission.new("fastpipe.loss_scaling:DynamicLossScaler", init_scale=2.0**10)
    scale = scaler.call("get_scale", returns=float)
    records = submission.run(loss_scaling.train, scaler, gradients, returns=list[dict[str, Any]])
    with raises("ValueError") as raised:
        submission.call("fastpipe.batching:first_fit_decreasing", [3, 12], 10)
    source = submission.source("fastpipe/loss_scaling.py")     # the submitted text, for static checks
    run = submission.run_isolated(tree, [python, "-m", "pytest", ...], time_limit_s=60)   # a fresh sandbox
    with submission.serve(tree, [python, "-m", "pkg.server", "--socket", "{sockets}/http.sock"]) as server:
        ...                                                  # a server in a fresh sandbox, over Unix sockets

`call` runs a function or class of the submission in the worker and returns its result as data (see `wire`);
`returns=` states the exact type the test accepts (no subclasses, `bool` is not an `int`), and anything else
fails the test with a message saying what came back. `new` keeps the result in the worker and returns a
`Remote` whose methods are called the same way. `run` calls a function of a *scenario* module,
`tests/hidden/scenarios/<name>.py`: code that must run next to the submission (a training loop with the
student's scaler, hooks on a model) and returns raw observations, never a verdict. Its source is sent to the
worker; it holds no expected values and does not import the submission at module level, so the checker can
import it too and run the same function on a reference. Every expected value is computed here.

`run_isolated` runs a command (a student's test suite, a pipeline) once in a fresh sandbox of its own, on a
source tree the test chose (`tree()` is the submission's; a test may swap in a reference with a bug planted
back), and returns what the harness observed: the exit status, which limit stopped it, the files it left in
its outbox (`suites.IsolatedRun`). Its time counts against the task's limit too. `serve` runs a server the
same way for as long as a `with` block lasts, reached over Unix sockets (`services`).

Each task has its own worker, forked when the task's first test calls it and forked again after it dies. The
time the worker spends on a task's calls counts against the task's time limit; when it runs out, or the
submission starts too many processes, the sandbox is killed and every later call of the task fails at once.
"""

from __future__ import annotations

import contextlib
import inspect
import time
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from common.grading import wire
from common.grading.faults import (
    NotDataError,
    ProcessLimitError,
    SubmissionFault,
    SubmissionRaised,
    TimeLimitError,
    WorkerDidNotStartError,
    WorkerEndedError,
    WrongTypeError,
)
from common.grading.services import Service, start_service
from common.grading.session import Session, WorkerLimits
from common.grading.suites import IsolatedRun, IsolatedSettings, run_isolated


class Sandboxes:
    """The one sandbox a checker process uses at a time, shared by its tasks' workers, one worker at a time."""

    def __init__(self, start: typing.Callable[[], Session], tmp: str) -> None:
        self._start = start
        self.tmp = tmp  # the worker's writable folder, as seen inside the sandbox
        self.session: Session | None = None
        self.owner: TaskRunner | None = None  # whose worker runs in the session now
        self.ended_outputs: list[str] = []  # the output of sandboxes that were replaced, for the TA's log

    def worker_for(self, runner: TaskRunner) -> Session:
        """The session with a live worker of `runner`, starting the sandbox or forking the worker as needed."""
        session = self.session
        if session is not None and session.alive and self.owner is runner:
            return session
        if session is not None and session.alive and self.owner is not None:
            session.end_worker()
        self.owner = None
        if session is not None and session.alive:
            try:
                return self._spawn(session, runner)
            except (WorkerEndedError, TimeLimitError, ProcessLimitError):
                session.kill()  # the submission may have broken this template: try once in a fresh sandbox
        started, replacing = time.monotonic(), session is not None  # replacing: one this submission broke
        if replacing:
            self.ended_outputs.append(session.output_tail())
        self.session = session = self._start()
        try:
            self._spawn(session, runner)
        except (WorkerEndedError, TimeLimitError, ProcessLimitError) as error:
            session.kill()  # no submission code had run in this sandbox: the machine's fault
            raise WorkerDidNotStartError(f"the worker did not start in a fresh sandbox: {error}") from None
        if replacing:  # the time to restart a sandbox the submission broke counts against its task
            runner.used_s += time.monotonic() - started
        return session

    def _spawn(self, session: Session, runner: TaskRunner) -> Session:
        session.spawn(runner.limits, f"{self.tmp}/{runner.task_id}")
        self.owner = runner
        runner.generation += 1
        return session

    def output(self) -> str:
        """Everything the sandboxes of this process printed (the last part of each)."""
        current = [self.session.output_tail()] if self.session is not None else []
        return "\n".join(filter(None, [*self.ended_outputs, *current]))

    def close(self) -> None:
        """Kill the sandbox, if one runs."""
        if self.session is not None:
            self.session.kill()


@dataclass
class TaskRunner:
    """One task's worker: its limits, its time budget, and what has gone wrong with it so far."""

    task_id: str
    time_limit_s: float
    limits: WorkerLimits
    sandboxes: Sandboxes
    scenarios: Path  # the folder of the assignment's scenario modules
    used_s: float = 0.0  # time spent on the submission's calls, and restarting sandboxes it broke
    generation: int = 0  # bumped at every fork of a new worker: handles of older workers are void
    stopped: SubmissionFault | None = None  # a time or process limit hit: every later call fails with it
    calls: int = 0
    isolated: IsolatedSettings | None = None  # how `run_isolated` runs commands (None: it cannot here)

    @property
    def timed_out(self) -> bool:
        return isinstance(self.stopped, TimeLimitError)

    @property
    def process_limit_hit(self) -> bool:
        return isinstance(self.stopped, ProcessLimitError)

    def request(
        self, what: str, target: dict[str, Any], args: tuple, kwargs: dict, keep: bool = False
    ) -> Any:
        """Send one call to the worker; its decoded result, a Remote (keep=True), or a SubmissionFault."""
        if self.stopped is not None:
            raise type(self.stopped)(f"not run: {self.stopped}")
        args_data, kwargs_data = self._encode(list(args)), self._encode(kwargs)
        session = self.sandboxes.worker_for(self)
        self.calls += 1
        message = {"op": "call", "id": self.calls, "target": target, "keep": keep,
                   "args": args_data, "kwargs": kwargs_data}  # fmt: skip
        start = time.monotonic()
        try:
            reply = session.exchange(message, self.time_limit_s - self.used_s)
        except TimeLimitError:
            self.stopped = TimeLimitError(
                f"the task's time limit of {self.time_limit_s:g} s ran out during {what}"
            )
            raise self.stopped from None
        except ProcessLimitError as error:
            self.stopped = ProcessLimitError(f"the submission was stopped during {what}: {error}")
            raise self.stopped from None
        except WorkerEndedError as error:
            self.sandboxes.owner = None  # the next call forks a new worker
            raise WorkerEndedError(f"{error} during {what}") from None
        finally:
            self.used_s += time.monotonic() - start
        return self._reply(what, reply)

    def run_isolated(
        self,
        what: str,
        tree: dict[str, bytes],
        argv: list[str],
        time_limit_s: float,
        env: dict[str, str],
        repeat: int,
    ) -> IsolatedRun:
        """`suites.run_isolated` within what is left of the task's time; a run cut short by the task's own
        limit stops the task like a call would."""
        if self.stopped is not None:
            raise type(self.stopped)(f"not run: {self.stopped}")
        if self.isolated is None:
            raise RuntimeError("this checker was not configured for isolated runs")
        left = self.time_limit_s - self.used_s
        run = run_isolated(
            tree, argv, time_limit_s, self.isolated, env, budget_s=max(left, 0.001), repeat=repeat
        )
        self.calls += 1
        self.used_s += 0.0 if run.cached else run.duration_s
        if run.stopped == "time limit" and left <= time_limit_s:
            self.stopped = TimeLimitError(
                f"the task's time limit of {self.time_limit_s:g} s ran out during {what}"
            )
            raise self.stopped
        return run

    @contextmanager
    def serve(
        self, what: str, tree: dict[str, bytes], argv: list[str], env: dict[str, str]
    ) -> Iterator[Service]:
        """`services.start_service` on what is left of the task's time; the server's whole run counts
        against it, and it is killed (with everything it started) when the block ends."""
        if self.stopped is not None:
            raise type(self.stopped)(f"not run: {self.stopped}")
        if self.isolated is None:
            raise RuntimeError("this checker was not configured for isolated runs")
        left = max(self.time_limit_s - self.used_s, 0.001)
        service = start_service(tree, argv, self.isolated, left, env)
        self.calls += 1
        try:
            yield service
        finally:
            self.used_s += service.stop()
            if service.stopped == "time limit":
                self.stopped = TimeLimitError(
                    f"the task's time limit of {self.time_limit_s:g} s ran out while {what} ran"
                )
            elif service.stopped == "process limit":
                self.stopped = ProcessLimitError(
                    f"{what} started more than {service.max_processes} processes"
                )
            if service.stopped:  # whatever the test saw (a refused connection) follows from this
                raise self.stopped

    def _encode(self, value: Any) -> Any:
        try:
            return wire.encode(_handles_to_wire(value, self))
        except wire.NotData as error:
            raise TypeError(f"a hidden test passed {error} to the submission: pass data") from None

    def _reply(self, what: str, reply: dict[str, Any]) -> Any:
        if "value" in reply:
            try:
                return wire.decode(reply["value"])
            except wire.WireError as error:
                raise WorkerEndedError(f"{what} sent malformed data ({error})") from None
        if type(reply.get("handle")) is int:
            return Remote(self, reply["handle"], self.generation, what)
        if type(reply.get("raised")) is dict:
            raised = reply["raised"]
            kinds = raised.get("kinds") if type(raised.get("kinds")) is list else []
            name, line = (raised.get(key) if type(raised.get(key)) is str else "" for key in ("name", "line"))
            kinds = [kind[:40] for kind in kinds[:8] if type(kind) is str]
            raise SubmissionRaised(what, kinds, name[:60], line[:160])
        if type(reply.get("not_data")) is str:
            raise NotDataError(
                f"{what} returned {reply['not_data'][:120]}, which is not data the grader accepts "
                "(return plain Python values and torch.Tensor)"
            )
        raise WorkerEndedError(f"{what} sent a reply the grader does not understand")


def _handles_to_wire(value: Any, runner: TaskRunner) -> Any:
    """Replace Remote objects (at any depth of lists, tuples, dicts) by handles of the live worker."""
    if isinstance(value, Remote):
        if value.runner is not runner or value.generation != runner.generation:
            raise WorkerEndedError(f"{value.what} lived in a process of the submission that has ended")
        return wire.Handle(value.handle)
    if type(value) is list:
        return [_handles_to_wire(item, runner) for item in value]
    if type(value) is tuple:
        return tuple(_handles_to_wire(item, runner) for item in value)
    if type(value) is dict:
        return {key: _handles_to_wire(item, runner) for key, item in value.items()}
    return value


class Remote:
    """An object of the submission that stays in the worker; its methods are called like `Submission.call`."""

    def __init__(self, runner: TaskRunner, handle: int, generation: int, what: str) -> None:
        self.runner, self.handle, self.generation, self.what = runner, handle, generation, what

    def call(self, method: str, *args: Any, returns: Any = Any, **kwargs: Any) -> Any:
        """`obj.method(*args, **kwargs)` in the worker; its result, checked against `returns`."""
        if self.generation != self.runner.generation or self.runner.sandboxes.owner is not self.runner:
            raise WorkerEndedError(f"{self.what} lived in a process of the submission that has ended")
        what = f"{self.what.split('(')[0]}.{method}"
        target = {"handle": self.handle, "method": method}
        return expect(self.runner.request(what, target, args, kwargs), returns, what)

    def __repr__(self) -> str:
        return f"<{self.what} in the submission's process>"


class Submission:
    """The submission under test, as a hidden test sees it (the `submission` fixture)."""

    def __init__(self, runner: TaskRunner, src: Path) -> None:
        self._runner, self._src = runner, src

    def call(self, target: str, *args: Any, returns: Any = Any, **kwargs: Any) -> Any:
        """Call `package.module:qualname` with data; its result, checked against `returns`."""
        what = target.rsplit(":", 1)[-1]
        return expect(self._runner.request(what, {"import": target}, args, kwargs), returns, what)

    def new(self, target: str, *args: Any, **kwargs: Any) -> Remote:
        """Call `package.module:qualname` (a class, usually) and keep the result in the worker."""
        what = target.rsplit(":", 1)[-1]
        return self._runner.request(what, {"import": target}, args, kwargs, keep=True)

    def run(self, scenario: Callable[..., Any], *args: Any, returns: Any = Any, **kwargs: Any) -> Any:
        """Call `scenario`, a function of a module in `tests/hidden/scenarios/`, in the worker.

        Its module's source is sent to the worker and run there; the same function may also be called here,
        in the trusted process, on a reference (the reference scaler, say) to compute the expected values.
        """
        path = Path(inspect.getsourcefile(scenario) or "")
        if path.parent.resolve() != self._runner.scenarios.resolve():
            raise TypeError(f"{scenario.__qualname__} is not a function of {self._runner.scenarios}")
        target = {"scenario": path.stem, "source": path.read_text(), "function": scenario.__qualname__}
        what = f"{path.stem}.{scenario.__qualname__}"
        return expect(self._runner.request(what, target, args, kwargs), returns, what)

    def source(self, path: str) -> str:
        """The text of a file the student submitted (or the starter's, if it was missing), read here."""
        return (self._src / path).read_text(errors="replace")

    def tree(self) -> dict[str, bytes]:
        """Every file of the `src/` folder this submission is graded on (its files over the starter's), read
        here as bytes: never imported, only handed to `run_isolated`."""
        return {
            path.relative_to(self._src).as_posix(): path.read_bytes()
            for path in sorted(self._src.rglob("*"))
            if path.is_file() and not path.is_symlink() and "__pycache__" not in path.parts
        }

    def run_isolated(
        self,
        tree: dict[str, bytes],
        argv: list[str],
        time_limit_s: float,
        env: dict[str, str] | None = None,
        repeat: int = 0,
    ) -> IsolatedRun:
        """Run `argv` once in a fresh sandbox whose /submission/src is `tree` (see `common.grading.suites`).

        What comes back is what the harness observed (exit status, limits hit, the outbox's files): a verdict
        drawn from it is decided here, never reported by the code that ran. Runs that differ only in `repeat`
        are separate runs (a verdict that must hold every time runs the command with repeat 0, 1, ...)."""
        what = PurePosixPath(argv[0]).name if argv else "a command"
        return self._runner.run_isolated(what, tree, argv, time_limit_s, env or {}, repeat)

    def serve(
        self, tree: dict[str, bytes], argv: list[str], env: dict[str, str] | None = None
    ) -> contextlib.AbstractContextManager[Service]:
        """Run a server (`argv`, on `tree`) in a fresh sandbox for the length of a `with` block; the test talks
        to it over Unix sockets it told the server to create in `{sockets}` (see `common.grading.services`).

        The server runs on the task's time from start to the block's end, and is killed with every process it
        started when the block ends."""
        what = "the server" if not argv else f"the server ({PurePosixPath(argv[0]).name})"
        return self._runner.serve(what, tree, argv, env or {})


@contextmanager
def raises(kind: str) -> Iterator[list[SubmissionRaised]]:
    """Expect the submission to raise an instance of the built-in exception `kind` inside the block.

    Yields a list that holds the SubmissionRaised afterwards (its `.name` and `.line` for further checks).
    """
    caught: list[SubmissionRaised] = []
    try:
        yield caught
    except SubmissionRaised as error:
        if not error.is_a(kind):
            raise AssertionError(f"expected {kind}, but {error}") from None
        caught.append(error)
    else:
        raise AssertionError(f"expected the submission to raise {kind}; it returned normally")


# ------------------------------------------------------------------------------------------ exact types
def expect(value: Any, spec: Any, what: str) -> Any:
    """`value` if it has exactly the type `spec` describes, else WrongTypeError saying where it differs.

    `spec` is a type (`int`, `torch.Tensor`), `None`, `Any`, a union (`int | None`), or `list[T]`,
    `tuple[T, ...]`, `tuple[T1, T2]`, `dict[K, V]` of those. Types match exactly: no subclasses, no bool for int.
    """
    problem = _mismatch(value, spec, "the result")
    if problem:
        raise WrongTypeError(f"{what} returned a wrong type: {problem}")
    return value


def _mismatch(value: Any, spec: Any, where: str) -> str | None:
    if spec is Any:
        return None
    if spec is None or spec is type(None):
        return None if value is None else f"{where} is {_kind(value)}, expected None"
    origin, args = typing.get_origin(spec), typing.get_args(spec)
    if origin in (typing.Union, types.UnionType):
        problems = [_mismatch(value, option, where) for option in args]
        return None if None in problems else f"{where} is {_kind(value)}, expected {_name(spec)}"
    expected = origin or spec
    if type(value) is not expected:
        return f"{where} is {_kind(value)}, expected {_name(spec)}"
    if origin is list:
        return next(filter(None, (_mismatch(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))), None)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            items = [(v, args[0]) for v in value]
        elif len(args) != len(value):
            return f"{where} has {len(value)} items, expected {len(args)}"
        else:
            items = list(zip(value, args, strict=True))
        return next(filter(None, (_mismatch(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(items))), None)
    if origin is dict:
        for key, item in value.items():
            problem = _mismatch(key, args[0], f"a key of {where}") or _mismatch(
                item, args[1], f"{where}[{key!r}]"
            )
            if problem:
                return problem
    return None


def _kind(value: Any) -> str:
    return "None" if value is None else f"a {type(value).__name__}"


def _name(spec: Any) -> str:
    return (
        getattr(spec, "__name__", None)
        if typing.get_origin(spec) is None
        else str(spec).replace("typing.", "")
    )
