"""Draw the week-4 lecture's diagrams as small SVG files next to this script.

    python week04_data_parallel/lecture/assets/figures.py

- ring_all_reduce.svg: what each rank holds after each step of a ring all-reduce on 4 ranks. The steps are
  simulated with the chunk indices of common/distributed/collectives.py (rank r ends the reduce-scatter with
  chunk r), so the picture is the algorithm the course's code runs, not a drawing of it.
- ddp_overlap.svg: one training step with a single all-reduce after backward, and with DDP's buckets.
  Schematic: the durations are made up; only the order of events is real.
- node_topology.svg: one 8-GPU H100/H200 node and its way out to the network, with the datasheet link rates
  per direction (schematic: one NVSwitch bar stands for the node's NVSwitch chips).
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
FONT = "Helvetica, Arial, sans-serif"
ARROW = (
    '<defs><marker id="arr" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
    'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#666"/></marker></defs>'
)


def svg(width: int, height: int, title: str, body: list[str]) -> str:
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" font-family="{FONT}">'
    )
    return "\n".join([head, f"<title>{title}</title>", ARROW, *body, "</svg>"]) + "\n"


def text(
    x: float,
    y: float,
    s: str,
    size: int = 14,
    anchor: str = "middle",
    weight: str = "normal",
    fill: str = "#222",
) -> str:
    s = s.replace("&", "&amp;").replace("<", "&lt;")
    return (
        f'<text x="{x:g}" y="{y:g}" font-size="{size}" text-anchor="{anchor}" font-weight="{weight}" '
        f'fill="{fill}">{s}</text>'
    )


def rect(
    x: float, y: float, w: float, h: float, fill: str, stroke: str = "none", width: float = 1, rx: float = 3
) -> str:
    return (
        f'<rect x="{x:g}" y="{y:g}" width="{w:g}" height="{h:g}" fill="{fill}" stroke="{stroke}" '
        f'stroke-width="{width:g}" rx="{rx:g}"/>'
    )


def line(
    x1: float,
    y1: float,
    x2: float,
    y2: float,
    stroke: str = "#666",
    width: float = 1.5,
    arrow: bool = False,
    dash: str = "",
) -> str:
    extra = ' marker-end="url(#arr)"' if arrow else ""
    extra += f' stroke-dasharray="{dash}"' if dash else ""
    return (
        f'<line x1="{x1:g}" y1="{y1:g}" x2="{x2:g}" y2="{y2:g}" stroke="{stroke}" '
        f'stroke-width="{width:g}"{extra}/>'
    )


# ----------------------------------------------------------------------------------------------------
# Ring all-reduce, simulated
# ----------------------------------------------------------------------------------------------------


def ring_states(p: int) -> list[tuple[str, list[list[frozenset[int]]], set[tuple[int, int]]]]:
    """(label, held[rank][chunk] = the ranks whose values are summed in it, cells received) per step."""
    held = [[frozenset({r}) for _ in range(p)] for r in range(p)]
    states = [("start", [row[:] for row in held], set())]
    for step in range(p - 1):  # reduce-scatter: receive chunk (r - s - 2) from the left and add it
        before = [row[:] for row in held]
        received = set()
        for r in range(p):
            c = (r - step - 2) % p
            held[r][c] = before[r][c] | before[(r - 1) % p][c]
            received.add((r, c))
        states.append((f"reduce-scatter {step + 1}", [row[:] for row in held], received))
    for step in range(p - 1):  # all-gather: receive the finished chunk (r - s - 1) from the left
        before = [row[:] for row in held]
        received = set()
        for r in range(p):
            c = (r - step - 1) % p
            held[r][c] = before[(r - 1) % p][c]
            received.add((r, c))
        states.append((f"all-gather {step + 1}", [row[:] for row in held], received))
    assert all(cell == frozenset(range(p)) for row in held for cell in row), "the ring must finish the sum"
    return states


def ring_figure(p: int = 4) -> str:
    shades = {1: "#eef3f9", 2: "#c7dbf1", 3: "#8fb8e3", 4: "#2f6db0"}
    cell, gap, left, top = 26, 26, 70, 74
    panel = p * cell + gap
    body = [
        text(left + 1.5 * panel + 2 * cell, 22, f"reduce-scatter: {p - 1} steps", 16, weight="bold"),
        text(left + 4.5 * panel + 2 * cell, 22, f"all-gather: {p - 1} steps", 16, weight="bold"),
        line(left + panel - gap / 2, 32, left + panel - gap / 2, top + p * cell + 10, "#bbb", 1, dash="4 4"),
        line(
            left + 4 * panel - gap / 2,
            32,
            left + 4 * panel - gap / 2,
            top + p * cell + 10,
            "#bbb",
            1,
            dash="4 4",
        ),
    ]
    for r in range(p):
        body.append(text(left - 10, top + r * cell + 18, f"rank {r}", 14, anchor="end"))
    for index, (label, held, received) in enumerate(ring_states(p)):
        x0 = left + index * panel
        name = label.split()[-1] if index else "start"
        body.append(text(x0 + p * cell / 2, top - 12, name, 14, weight="bold" if index == 0 else "normal"))
        for r in range(p):
            for c in range(p):
                n = len(held[r][c])
                outline = ("#d9480f", 2.5) if (r, c) in received else ("#ffffff", 1)
                body.append(
                    rect(x0 + c * cell, top + r * cell, cell, cell, shades[n], outline[0], outline[1], 0)
                )
                body.append(
                    text(
                        x0 + c * cell + cell / 2,
                        top + r * cell + 18,
                        str(n),
                        13,
                        fill="#fff" if n == p else "#123e6b",
                    )
                )
    y = top + p * cell + 34
    caption = [
        f"Columns: the {p} chunks of the tensor. A number: how many ranks' values that copy of the chunk holds, "
        f"summed ({p} = the full sum).",
        "Outlined: the chunk a rank received from its left neighbour (rank r-1) in that step. Reduce-scatter adds",
        "what arrives, so after p-1 steps rank r holds chunk r of the sum; all-gather passes the finished chunks on.",
    ]
    body += [text(left, y + 20 * i, s, 13, anchor="start", fill="#444") for i, s in enumerate(caption)]
    return svg(1100, y + 54, f"Ring all-reduce on {p} ranks, step by step", body)


# ----------------------------------------------------------------------------------------------------
# DDP: communication overlapped with backward
# ----------------------------------------------------------------------------------------------------


def overlap_figure() -> str:
    x0, scale = 190, 1.05
    colors = {"fwd": "#9ec5ee", "bwd": "#f6c177", "comm": "#b5d99c", "opt": "#d4b8e8"}
    body: list[str] = []

    def bar(t0: float, t1: float, y: float, kind: str, label: str) -> None:
        body.append(rect(x0 + t0 * scale, y, (t1 - t0) * scale - 2, 30, colors[kind]))
        body.append(text(x0 + (t0 + t1) / 2 * scale, y + 20, label, 13))

    def scenario(y: float, title: str, comm: list[tuple[float, float, str]], opt_at: float) -> float:
        body.append(text(10, y - 10, title, 15, anchor="start", weight="bold"))
        body.append(text(10, y + 20, "compute", 14, anchor="start"))
        body.append(text(10, y + 60, "communication", 14, anchor="start"))
        bar(0, 200, y, "fwd", "forward")
        for i, layer in enumerate((4, 3, 2, 1)):
            bar(200 + 80 * i, 280 + 80 * i, y, "bwd", f"bwd L{layer}")
        for t0, t1, label in comm:
            bar(t0, t1, y + 40, "comm", label)
        bar(opt_at, opt_at + 40, y, "opt", "opt.")
        end = x0 + (opt_at + 40) * scale
        body.append(line(end, y - 6, end, y + 76, "#222", 1.5, dash="3 3"))
        return end

    end_a = scenario(
        40,
        "One all-reduce after the backward: the network waits for the GPU, then the GPU waits",
        [(520, 760, "all-reduce of every gradient")],
        760,
    )
    end_b = scenario(
        170,
        "DDP: a bucket's all-reduce starts as soon as its gradients are ready",
        [(280 + 80 * i, 340 + 80 * i, f"bucket {i + 1}") for i in range(4)],
        600,
    )
    body.append(line(end_b + 4, 226, end_a - 4, 226, "#666", 1.5, arrow=True))
    body.append(text((end_a + end_b) / 2, 218, "shorter step", 13))
    caption = [
        "bwd Lk: the backward of layer k, so gradients arrive last layer first; opt.: the optimizer step.",
        "Only the last bucket (the first layers' gradients) has no backward left to hide behind. Schematic: "
        "durations are made up.",
    ]
    body += [text(10, 296 + 20 * i, s, 13, anchor="start", fill="#444") for i, s in enumerate(caption)]
    return svg(1100, 330, "DDP overlaps gradient all-reduce with the backward pass", body)


# ----------------------------------------------------------------------------------------------------
# One node and the network
# ----------------------------------------------------------------------------------------------------


def topology_figure() -> str:
    body: list[str] = []
    gx, gw, step = 40, 92, 112
    body.append(rect(20, 14, 1060, 42, "#e9ecef", "#adb5bd"))
    body.append(
        text(550, 41, "InfiniBand fabric (leaf and spine switches): other nodes attach the same way", 15)
    )
    for i in range(8):
        x = gx + i * step
        body.append(line(x + gw / 2, 92, x + gw / 2, 56, "#868e96", 3))
        body.append(rect(x, 92, gw, 34, "#ffe8cc", "#e8590c"))
        body.append(text(x + gw / 2, 114, f"NIC {i}", 13))
        body.append(line(x + gw / 2, 126, x + gw / 2, 170, "#e8590c", 2))
        body.append(rect(x, 170, gw, 44, "#76b900"))
        body.append(text(x + gw / 2, 197, f"GPU {i}", 15, fill="#fff", weight="bold"))
        body.append(line(x + gw / 2, 214, x + gw / 2, 262, "#2f6db0", 6))
    body.append(rect(gx, 262, 7 * step + gw, 40, "#9ec5ee", "#2f6db0"))
    body.append(text(gx + (7 * step + gw) / 2, 288, "NVSwitch: any GPU to any GPU at full NVLink rate", 15))
    notes = [
        (76, "#555", "InfiniBand NDR: 400 Gb/s = 50 GB/s each way per NIC, one NIC per GPU"),
        (152, "#e8590c", "PCIe 5.0 x16: ≈ 64 GB/s each way (NIC to GPU memory: GPUDirect RDMA)"),
        (
            240,
            "#2f6db0",
            "NVLink 4: 18 links x 25 GB/s = 450 GB/s each way (datasheets: 900 GB/s, both ways)",
        ),
    ]
    for y, color, note in notes:
        body.append(rect(gx + 2 * step - 6, y - 15, 640, 21, "#ffffff", rx=2))
        body.append(text(gx + 2 * step, y, note, 13, anchor="start", fill=color, weight="bold"))
    body.append(
        text(
            20,
            332,
            "Per GPU: 450 GB/s to the other 7 GPUs of its node, 50 GB/s to every other node: "
            "a factor of 9. Schematic: the NVSwitch bar stands for the node's NVSwitch chips.",
            13,
            anchor="start",
            fill="#444",
        )
    )
    return svg(1100, 344, "An 8-GPU H100/H200 node and the network, per-direction rates", body)


def main() -> None:
    for name, draw in (
        ("ring_all_reduce.svg", ring_figure),
        ("ddp_overlap.svg", overlap_figure),
        ("node_topology.svg", topology_figure),
    ):
        (HERE / name).write_text(draw())
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
