"""`common.grading.source_scan`: every name a source spells out, sorted by where it appears."""

from __future__ import annotations

import textwrap

import pytest

from common.grading.source_scan import scan_source

SOURCE = textwrap.dedent(
    '''
    """Module docstring naming GradScaler."""
    import torch.distributed.fsdp
    import numpy as np
    from torch.amp import GradScaler as Scaler
    from . import sibling


    class Model:
        """Class docstring: eval."""

        def forward(self, x):
            """Method docstring."""
            "a bare string statement is not a docstring"
            scale = getattr(torch, "_amp_update_scale_")
            return x.eval(), exec
    '''
)


@pytest.fixture(scope="module")
def scanned():
    return scan_source(SOURCE)


def test_names_and_attributes_are_kept_apart(scanned) -> None:
    # `self` is a parameter that the method never reads: no name
    assert scanned.names == {"x", "exec", "getattr", "torch", "scale"}
    assert "eval" not in scanned.names  # `x.eval()` uses an attribute, not the builtin
    assert scanned.attributes == {"eval"}


def test_imports_name_modules_and_what_they_bring_in(scanned) -> None:
    assert scanned.imports == {
        "torch.distributed.fsdp", "numpy", "torch.amp", "torch.amp.GradScaler", "", ".sibling",
    }  # fmt: skip
    assert scanned.imported_names == {"torch", "numpy", "np", "GradScaler", "Scaler", "sibling"}
    assert {"GradScaler", "Scaler", "np", "eval", "x"} <= scanned.identifiers


def test_strings_leave_docstrings_out(scanned) -> None:
    assert scanned.strings == {"_amp_update_scale_", "a bare string statement is not a docstring"}


def test_a_source_that_does_not_parse_raises() -> None:
    with pytest.raises(SyntaxError):
        scan_source("def broken(:\n")
