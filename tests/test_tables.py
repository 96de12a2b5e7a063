"""common.tables: the aligned text tables the seminars print."""

from __future__ import annotations

import pytest

from common.tables import format_table


def test_columns_are_aligned() -> None:
    text = format_table(["size", "ms"], [["small", 1.5], ["a longer label", 120.25]])
    assert text.splitlines() == [
        "size                ms",
        "--------------  ------",
        "small              1.5",
        "a longer label  120.25",
    ]


def test_a_ragged_row_is_refused() -> None:
    with pytest.raises(ValueError, match="2 cells but the header has 3"):
        format_table(["a", "b", "c"], [[1, 2]])
