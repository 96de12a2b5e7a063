"""The slide pipeline: every deck builds offline, has the slides it should, draws, and its code runs."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from common import slides
from common.grading.forkserver import run_python
from common.weeks import Week, weeks_with_slides

DECKS = weeks_with_slides()
BLOCK_TIMEOUT_S = 120  # one slide's code block
SAMPLE = """---
marp: true
math: mathjax
paginate: true
---
# Title

---
## Code with a rule inside a fence
```text
---
```

<!-- requires: cuda -->
```python
import torch
torch.ones(1, device="cuda")
```

---
![diagram](assets/box.svg)
"""


def needs_chromium() -> None:
    """Skip locally without Chromium, but never in CI: there, a missing browser is a failure."""
    if slides.chromium_executable() is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install Chromium to render slides (apt-get install chromium)")
        pytest.skip("Chromium is not installed")


def test_count_slides_ignores_front_matter_and_fences() -> None:
    assert slides.count_slides(SAMPLE) == 3


def test_code_blocks_know_which_need_cuda() -> None:
    blocks = slides.code_blocks(SAMPLE)
    assert [(block.language, block.requires_cuda) for block in blocks] == [("text", False), ("python", True)]
    assert blocks[1].code == 'import torch\ntorch.ones(1, device="cuda")'


def test_local_images_are_inlined(tmp_path) -> None:
    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / "box.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    html = (
        '<img src="assets/box.svg" alt=""><figure style="background-image:url(&quot;assets/box.svg&quot;)">'
    )
    inlined = slides.inline_local_images(html, SAMPLE, tmp_path)
    assert "assets/box.svg" not in inlined
    assert inlined.count("data:image/svg+xml;base64,") == 2
    with pytest.raises(slides.SlideBuildError, match="does not exist"):
        slides.inline_local_images(html, "![x](assets/missing.png)", tmp_path)


def test_remote_references_are_found() -> None:
    page = '<link href="https://cdn.example/x.css"><a href="https://pytorch.org">docs</a><style>@import "https://fonts.example/f";</style>'
    assert slides.remote_references(page) == ["https://cdn.example/x.css", "https://fonts.example/f"]


@pytest.mark.parametrize("week", DECKS, ids=lambda week: week.name)
def test_front_matter(week: Week) -> None:
    head = week.slides_md.read_text().split("\n---\n", 1)[0]
    for directive in ("marp: true", "math: mathjax", "paginate: true"):
        assert directive in head


@pytest.mark.parametrize("week", DECKS, ids=lambda week: week.name)
def test_deck_builds_offline_with_every_slide(week: Week, tmp_path) -> None:
    built = slides.build(week, tmp_path)
    expected = slides.count_slides(week.slides_md.read_text())
    assert built.n_slides == expected
    assert 20 <= expected <= 45, "a lecture is about 25-40 slides"
    page = built.html.read_text()
    assert slides.remote_references(page) == []
    for image in slides.local_images(week.slides_md.read_text()):
        assert image not in page, f"{image} is not inlined: the HTML would not stand alone"
    assert "<script src=" not in page.replace('<script src="data:', "")


@pytest.mark.parametrize("week", DECKS, ids=lambda week: week.name)
def test_deck_builds_to_pdf_and_leaves_no_temporary_files(
    week: Week, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    needs_chromium()
    # Short: Chromium's socket path below it must fit in 108 bytes, which pytest's tmp_path does not.
    scratch = Path(tempfile.mkdtemp(prefix="effdl-test-", dir="/tmp"))
    monkeypatch.setenv("TMPDIR", str(scratch))  # where Marp's browser profile would stay behind
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    try:
        built = slides.build(week, tmp_path, pdf=True)
        assert built.pdf is not None and built.pdf.read_bytes().startswith(b"%PDF")
        assert list(scratch.iterdir()) == []
    finally:
        shutil.rmtree(scratch)


@pytest.mark.parametrize("week", DECKS[:1], ids=lambda week: week.name)
def test_title_slide_renders_to_a_picture_that_is_not_blank(week: Week, tmp_path) -> None:
    from PIL import Image, ImageStat

    needs_chromium()
    png = slides.render_first_slide(week, tmp_path / "title.png")
    image = Image.open(png).convert("L")
    assert image.size[0] >= 1280
    # Text on a plain background: many grey levels and a visible spread, not one flat colour.
    assert len(image.getcolors(maxcolors=1 << 16) or []) > 16
    assert ImageStat.Stat(image).stddev[0] > 5


def _slide_code(cuda: bool) -> list[tuple[Week, slides.CodeBlock]]:
    return [
        (week, block)
        for week in DECKS
        for block in slides.code_blocks(week.slides_md.read_text())
        if block.language == "python" and block.requires_cuda == cuda
    ]


def _block_id(value: Week | slides.CodeBlock) -> str:
    """`week09_inference_algorithms-line589`: selectable per deck with -k, unique across decks."""
    return value.name if isinstance(value, Week) else f"line{value.line}"


def _run_block(week: Week, block: slides.CodeBlock, tmp_path: Path) -> None:
    """The block as `python -c` runs it from the repository's root, in a fork of a server that has imported
    torch (common.grading.forkserver.run_python): each block is spared the seconds of a fresh import."""
    output = tmp_path / "output.log"
    status = run_python(block.code, week.dir.parent, dict(os.environ), output, timeout_s=BLOCK_TIMEOUT_S)
    where = f"{week.slides_md}:{block.line}"
    assert status is not None, f"{where} ran past {BLOCK_TIMEOUT_S} s"
    assert status == 0, f"{where} does not run (exit status {status}):\n{output.read_text()[-2000:]}"


@pytest.mark.parametrize(("week", "block"), _slide_code(cuda=False), ids=_block_id)
def test_code_on_slides_runs(week: Week, block: slides.CodeBlock, tmp_path: Path) -> None:
    _run_block(week, block, tmp_path)


@pytest.mark.gpu
@pytest.mark.parametrize(("week", "block"), _slide_code(cuda=True), ids=_block_id)
def test_cuda_code_on_slides_runs(week: Week, block: slides.CodeBlock, tmp_path: Path) -> None:
    _run_block(week, block, tmp_path)
