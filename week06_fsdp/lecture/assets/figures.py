"""Draw the week-6 lecture's diagram as a small SVG file next to this script.

    python week06_fsdp/lecture/assets/figures.py

- fsdp_streams.svg: one FSDP2 training step of a root unit and three blocks, on three CUDA streams (compute,
  all-gather, reduce-scatter). The order of events follows FSDP2's hooks (torch 2.11, _fsdp_state.py and
  _fsdp_param_group.py): all-gather before a unit's forward, free after it (not the root's), all-gather again
  before its backward with the next unit's all-gather prefetched, reduce-scatter after it, and the step ending
  when the last reduce-scatter does. Schematic: the durations are made up (a block's backward twice its
  forward, an all-gather or reduce-scatter half a forward); the prefetch is one unit deep, so at most two
  blocks are gathered at a time.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
FONT = "Helvetica, Arial, sans-serif"

FORWARD, BACKWARD, COLLECTIVE, EDGE = 2.0, 4.0, 1.0, 0.8  # schematic durations; EDGE: embedding or output
BLOCKS = 3


def svg(width: int, height: int, title: str, body: list[str]) -> str:
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" font-family="{FONT}">'
    )
    return "\n".join([head, f"<title>{title}</title>", *body, "</svg>"]) + "\n"


def text(x: float, y: float, s: str, size: int = 14, anchor: str = "middle", fill: str = "#222") -> str:
    s = s.replace("&", "&amp;").replace("<", "&lt;")
    return f'<text x="{x:g}" y="{y:g}" font-size="{size}" text-anchor="{anchor}" fill="{fill}">{s}</text>'


def rect(x: float, y: float, w: float, h: float, fill: str) -> str:
    return f'<rect x="{x:g}" y="{y:g}" width="{w:g}" height="{h:g}" fill="{fill}" rx="3"/>'


Span = tuple[float, float, str]  # start, end, label


def fsdp_step() -> dict[str, list[Span]]:
    """The three streams' spans of one step, each event as early as its dependencies allow."""
    compute: list[Span] = []
    gather: list[Span] = []
    reduce: list[Span] = []

    def on(stream: list[Span], start: float, duration: float, label: str) -> float:
        begin = max(start, stream[-1][1] if stream else 0.0)  # a stream runs one thing at a time
        stream.append((begin, begin + duration, label))
        return begin + duration

    # Forward. The root's all-gather (embedding, final norm, output layer) comes first and is kept.
    gathered = {"root": on(gather, 0, COLLECTIVE, "AG R")}
    now = on(compute, gathered["root"], EDGE, "emb")
    forward_end: dict[int, float] = {}
    for b in range(1, BLOCKS + 1):
        # Implicit prefetch: the CPU issues block b's all-gather as soon as the stream is free, but a third
        # gathered block must wait until block b - 2 is freed after its forward.
        gathered[b] = on(gather, forward_end.get(b - 2, 0.0), COLLECTIVE, f"AG {b}")
        forward_end[b] = now = on(compute, max(now, gathered[b]), FORWARD, f"F{b}")
    now = on(compute, now, EDGE, "out")
    # Backward, last block first. The root's pre-backward prefetches the last block's all-gather; each
    # block's pre-backward prefetches the block before it; each reduce-scatter follows its block's backward.
    regathered = {BLOCKS: on(gather, now, COLLECTIVE, f"AG {BLOCKS}")}
    now = on(compute, now, EDGE, "out")
    for b in range(BLOCKS, 0, -1):
        start = max(now, regathered[b])
        if b > 1:
            regathered[b - 1] = on(gather, start, COLLECTIVE, f"AG {b - 1}")
        now = on(compute, start, BACKWARD, f"B{b}")
        on(reduce, now, COLLECTIVE, f"RS {b}")
    now = on(compute, now, EDGE, "emb")
    on(reduce, now, COLLECTIVE, "RS R")
    return {"compute": compute, "all-gather": gather, "reduce-scatter": reduce}


def streams_figure() -> str:
    streams = fsdp_step()
    x0, scale, row = 170, 44, 46
    colors = {"F": "#9ec5ee", "B": "#f6c177", "AG": "#b5d99c", "RS": "#e8a9a9", "root": "#d9d9d9"}

    def color(label: str) -> str:
        kind = label.split()[0]
        return colors.get(kind) or colors.get(kind[0] if kind[1:].isdigit() else "root", colors["root"])

    body: list[str] = []
    for i, (name, spans) in enumerate(streams.items()):
        y = 20 + i * row
        body.append(text(10, y + 21, f"{name} stream", 14, anchor="start"))
        for t0, t1, label in spans:
            body.append(rect(x0 + t0 * scale, y, (t1 - t0) * scale - 2, 30, color(label)))
            body.append(text(x0 + (t0 + t1) / 2 * scale, y + 20, label, 12))
    end = max(t1 for spans in streams.values() for _, t1, _ in spans)
    x_end = x0 + end * scale
    body.append(
        f'<line x1="{x_end:g}" y1="12" x2="{x_end:g}" y2="{20 + 3 * row:g}" stroke="#222" '
        'stroke-width="1.5" stroke-dasharray="3 3"/>'
    )
    caption = [
        "AG b: all-gather block b's shards; Fb, Bb: its forward and backward; RS b: reduce-scatter its gradients.",
        "R: the root unit; emb, out: its embedding and output layer (gathered once, kept until backward). The step",
        "ends with the last reduce-scatter. Schematic: the order follows FSDP2's hooks; the durations are made up.",
    ]
    top = 20 + 3 * row + 22
    body += [text(10, top + 18 * i, s, 13, anchor="start", fill="#444") for i, s in enumerate(caption)]
    width = int(x0 + end * scale + 20)
    return svg(width, top + 18 * len(caption), "One FSDP2 step on three streams", body)


def main() -> None:
    path = HERE / "fsdp_streams.svg"
    path.write_text(streams_figure())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
