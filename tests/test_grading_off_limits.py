"""`common.grading.off_limits`: a refused module cannot be imported again, with the task's reason, and the rest of
its package still can."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_a_refused_module_is_dropped_and_cannot_be_imported_again() -> None:
    # In a child process: the refusal changes sys.meta_path and sys.modules for good.
    script = textwrap.dedent(
        """
        import importlib
        import common.inference.speculative
        import common.inference
        from common.grading.off_limits import refuse_imports

        refuse_imports(["common.inference.speculative"], "write it yourself")
        assert "speculative" not in vars(common.inference), "the parent package still holds the module"
        try:
            importlib.import_module("common.inference.speculative")
        except ModuleNotFoundError as error:
            print(error)
        else:
            raise SystemExit("the refused module was imported")
        importlib.import_module("common.inference.generate")  # its neighbours are not refused
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == (
        "common.inference.speculative is off limits in this task: write it yourself"
    ), run.stdout
