"""Week 2's example project: its own test suite passes without a network, with a coverage report.

The pipeline (DVC) and its W&B runs are tested in test_week02_dvc.py.
"""

from __future__ import annotations

import re
from pathlib import Path

from week02_project import PROJECT, python, run_offline


def test_the_network_is_really_gone_in_run_offline(tmp_path: Path) -> None:
    """The guard the other tests rely on: inside it, connecting anywhere but loopback fails at once."""
    probe = "import socket; socket.create_connection(('1.1.1.1', 443), timeout=5)"
    done = run_offline(python("-c", probe), cwd=tmp_path)
    assert done.returncode != 0 and "unreachable" in done.stderr.lower(), done.stderr


def test_the_projects_own_tests_pass_with_a_coverage_report(tmp_path: Path) -> None:
    done = run_offline(
        python("-m", "pytest", "-q", "-p", "no:cacheprovider"),
        cwd=PROJECT,
        COVERAGE_FILE=str(tmp_path / ".coverage"),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert re.search(r"\d+ passed", done.stdout)
    total = re.search(r"^TOTAL\s.*?(\d+)%$", done.stdout, re.MULTILINE)
    assert total is not None, "no coverage report in the output:\n" + done.stdout[-2000:]
    assert int(total.group(1)) >= 90  # .coveragerc's fail_under
