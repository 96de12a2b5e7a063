"""The slide pipeline: each week's `lecture/slides.md` (Marp) becomes one offline HTML file, and a PDF.

Marp renders math with MathJax into inline SVG, so the HTML needs no fonts or scripts from a CDN; local images
are inlined as data URIs, so the one file can be mailed or opened from a USB stick. PDFs and PNG previews
need Chromium, which Marp drives headless.
"""

from __future__ import annotations

import base64
import mimetypes
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from common.errors import EffdlError, MissingDependencyError
from common.weeks import REPO_ROOT, Week

MARP = REPO_ROOT / "node_modules" / ".bin" / "marp"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
REQUIRES_CUDA = "<!-- requires: cuda -->"
_FENCE = re.compile(r"^(```+|~~~+)\s*(\w*)")
# Markdown images `![alt](path)` with a local path; remote images are refused by `check_offline`.
_IMAGE = re.compile(r"(!\[[^\]]*\]\()([^)\s]+)(\s+\"[^\"]*\")?\)")


class SlideBuildError(EffdlError):
    """Marp failed on a deck."""


@dataclass(frozen=True)
class CodeBlock:
    """A fenced code block on a slide: code shown to students must run."""

    language: str
    code: str
    line: int
    requires_cuda: bool


@dataclass(frozen=True)
class SlideBuild:
    week: Week
    html: Path
    pdf: Path | None
    n_slides: int


def marp_executable() -> Path:
    if not MARP.exists():
        raise MissingDependencyError(
            "the Marp CLI is not installed: run `npm ci` in the repository root (needs Node.js)"
        )
    return MARP


def chromium_executable() -> str | None:
    """Chromium for PDFs and previews: `$CHROME_PATH`, else the first Chromium or Chrome on PATH."""
    if os.environ.get("CHROME_PATH"):
        return os.environ["CHROME_PATH"]
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _strip_front_matter(text: str) -> str:
    if text.startswith("---\n"):
        end = text.find("\n---\n", 4)
        if end != -1:
            return text[end + len("\n---\n") :]
    return text


def count_slides(markdown: str) -> int:
    """Number of slides in a Marp deck: `---` separators outside code blocks, plus one."""
    body = _strip_front_matter(markdown)
    separators, fence = 0, None
    for line in body.splitlines():
        match = _FENCE.match(line)
        if match and (fence is None or line.strip().startswith(fence)):
            fence = None if fence else match.group(1)
        elif fence is None and line.strip() == "---":
            separators += 1
    return separators + 1


def code_blocks(markdown: str) -> list[CodeBlock]:
    """Fenced code blocks of a deck; a block right after `<!-- requires: cuda -->` runs only on a GPU."""
    blocks: list[CodeBlock] = []
    lines = markdown.splitlines()
    index = 0
    while index < len(lines):
        match = _FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        fence, language, start = match.group(1), match.group(2), index
        end = start + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        previous = next((line.strip() for line in reversed(lines[:start]) if line.strip()), "")
        blocks.append(
            CodeBlock(
                language=language,
                code="\n".join(lines[start + 1 : end]),
                line=start + 1,
                requires_cuda=previous == REQUIRES_CUDA,
            )
        )
        index = end + 1
    return blocks


def local_images(markdown: str) -> list[str]:
    """Local image paths a deck references (`![...](assets/x.svg)`), remote and data URLs left out."""
    targets = (match.group(2) for match in _IMAGE.finditer(markdown))
    return sorted({target for target in targets if not re.match(r"^(https?:|data:)", target)})


def inline_local_images(html: str, markdown: str, base_dir: Path) -> str:
    """Put the deck's local images into the built HTML as data URIs, so that the one file stands alone.

    This is done on Marp's output rather than its input: markdown-it refuses `data:image/svg+xml` links.
    """
    for target in local_images(markdown):
        path = (base_dir / target).resolve()
        if not path.is_file():
            raise SlideBuildError(f"image {target!r} referenced by the slides does not exist ({path})")
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        data_uri = f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"
        # Marp writes images as <img src="..."> and backgrounds as url(&quot;...&quot;).
        html = re.sub(rf'(src="|url\(&quot;|url\("){re.escape(target)}(?=["&])', rf"\g<1>{data_uri}", html)
    return html


def remote_references(html: str) -> list[str]:
    """URLs the page would fetch when opened (scripts, stylesheets, images, fonts); links to click are fine."""
    fetched = re.findall(
        r"<(?:script|link|img|source|iframe)\b[^>]*?(?:src|href)=\"(https?://[^\"]+)\"", html
    )
    fetched += re.findall(r"url\(\s*['\"]?(https?://[^'\")]+)", html)
    fetched += re.findall(r"@import\s+['\"](https?://[^'\"]+)", html)
    return sorted(set(fetched))


def _run_marp(source: Path, output: Path, *extra: str) -> None:
    chromium = chromium_executable()
    command = [
        str(marp_executable()),
        "--no-stdin",
        "--allow-local-files",
        *extra,
        str(source),
        "-o",
        str(output),
    ]
    # Marp leaves behind the browser profile it renders PDF and PNG with (/tmp/marp-cli-*): give it a
    # temporary folder of its own, removed with everything in it.
    with tempfile.TemporaryDirectory(prefix="effdl-marp-") as scratch:
        env = {**os.environ, "TMPDIR": scratch, **({"CHROME_PATH": chromium} if chromium else {})}
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    if result.returncode != 0 or not output.exists():
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise SlideBuildError(f"Marp failed on {source}: {detail[-1] if detail else 'no output'}")


def build(week: Week, out_dir: Path, *, pdf: bool = False) -> SlideBuild:
    """Build `week`'s deck into `out_dir/<week>.html` (and `.pdf`); check it is offline and complete."""
    marp_executable()
    if not week.has_slides:
        raise SlideBuildError(f"{week.name} has no slides yet ({week.slides_md} is missing)")
    if pdf and chromium_executable() is None:
        raise MissingDependencyError(
            "PDF export needs Chromium: install it (e.g. `apt-get install chromium`) or set CHROME_PATH"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = week.slides_md.read_text()
    html = out_dir / f"{week.name}.html"
    _run_marp(week.slides_md, html, "--html")
    page = inline_local_images(html.read_text(), markdown, week.slides_md.parent)
    html.write_text(page)
    pdf_path = None
    if pdf:
        pdf_path = out_dir / f"{week.name}.pdf"
        _run_marp(week.slides_md, pdf_path, "--html", "--pdf")
    remote = remote_references(page)
    if remote:
        raise SlideBuildError(
            f"{week.name} slides fetch from the network when opened: {', '.join(remote[:3])}"
        )
    n_slides = page.count("<svg data-marpit-svg")
    return SlideBuild(week=week, html=html, pdf=pdf_path, n_slides=n_slides)


def render_first_slide(week: Week, out_path: Path) -> Path:
    """Render the title slide to PNG with headless Chromium (a check that the deck really draws)."""
    if chromium_executable() is None:
        raise MissingDependencyError("rendering slides needs Chromium: install it or set CHROME_PATH")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _run_marp(week.slides_md, out_path, "--html", "--image", "png")
    return out_path
