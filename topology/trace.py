"""Pictures of a run: a Chrome/Perfetto trace and a Gantt chart, one row per node."""
from __future__ import annotations

import json
from pathlib import Path

from topology.simulator import Event

_COLOURS = {"F": "#4c72b0", "B": "#dd8452", "L": "#55a868", "allreduce": "#c44e52"}
_ALLREDUCE_ALPHA = 0.45  # lighter: it overlaps compute of the next stage, and the legend matches it


def chrome_trace(events: list[Event], node_labels: list[str]) -> dict:
    """Trace Event Format: one thread per node for compute, one per node for its sends and all-reduce."""
    out = []
    for i, label in enumerate(node_labels):
        out.append({"ph": "M", "name": "thread_name", "pid": 0, "tid": 2 * i, "args": {"name": f"{label} compute"}})
        out.append({"ph": "M", "name": "thread_name", "pid": 0, "tid": 2 * i + 1, "args": {"name": f"{label} network"}})
    for e in events:
        tid = 2 * e.node + (0 if e.kind == "compute" else 1)
        out.append({"ph": "X", "name": e.name, "cat": e.kind, "pid": 0, "tid": tid,
                    "ts": round(e.start * 1e6, 3), "dur": round((e.end - e.start) * 1e6, 3)})
    return {"traceEvents": out, "displayTimeUnit": "ms"}


def write_trace(path: str | Path, events: list[Event], node_labels: list[str]) -> None:
    Path(path).write_text(json.dumps(chrome_trace(events, node_labels)))


def _action(name: str) -> tuple[str, int, int] | None:
    """'F3@2' -> ('F', 3, 2): kind, microbatch, stage; None for anything else."""
    kind, sep, rest = name[:1], name[1:2], name[1:]
    micro, at, stage = rest.partition("@")
    if kind in "FLB" and at and micro.isdigit() and stage.isdigit() and sep:
        return kind, int(micro), int(stage)
    return None


def path_of(events: list[Event], microbatch: int) -> list[int]:
    """The stages `microbatch`'s forward pass visited, in the order it visited them."""
    visits = sorted((e.start, a[2]) for e in events if e.kind == "compute" and (a := _action(e.name))
                    and a[0] == "F" and a[1] == microbatch)
    return [stage for _, stage in visits]


def plot_gantt(path: str | Path, events: list[Event], node_labels: list[str], title: str = "",
               highlight: int | None = 0) -> None:
    """Gantt chart, one row per node: every compute bar labelled with its microbatch, coloured by kind.

    Forward, loss and backward bars carry their microbatch number; the stage all-reduces are drawn
    lighter, and the legend (outside the plot, to the right) uses exactly the bars' colours. Microbatch
    `highlight` (None: none) is outlined in black, and the legend lists the stages it visited and the
    ones it skipped, so that a reader can follow one partial, possibly reordered path across the rows.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = len(node_labels)
    end = max((e.end for e in events), default=1.0)
    width = 16.0
    fig, ax = plt.subplots(figsize=(width, max(2.5, 0.34 * rows + 1.4)))
    seconds_per_inch = end / (width * 0.72)  # the axes take about 72% of the width beside labels and legend
    stages = set()
    for e in events:
        if e.kind == "send":
            continue
        action = _action(e.name) if e.kind == "compute" else None
        colour = _COLOURS["allreduce"] if e.kind == "allreduce" else _COLOURS[e.name[0]]
        alpha = _ALLREDUCE_ALPHA if e.kind == "allreduce" else 1.0
        outlined = action is not None and action[1] == highlight
        ax.barh(e.node, e.end - e.start, left=e.start, height=0.8, color=colour, alpha=alpha,
                edgecolor="black" if outlined else "white", linewidth=1.6 if outlined else 0.3)
        if action is None:
            continue
        stages.add(action[2])
        # The microbatch number inside its bar, where the bar is wide enough for it (about 0.1 inch a digit).
        if (e.end - e.start) / seconds_per_inch >= 0.1 * len(str(action[1])) + 0.04:
            ax.text((e.start + e.end) / 2, e.node, str(action[1]), ha="center", va="center", fontsize=6.5,
                    color="white", fontweight="bold" if outlined else "normal")
    ax.set_yticks(range(rows), node_labels, fontsize=7 if rows > 24 else 9)
    ax.invert_yaxis()
    ax.set_xlim(0, end * 1.01)
    ax.set_xlabel("seconds since the iteration started")
    ax.set_title(title)
    handles = [Patch(facecolor=c, label=k) for k, c in
               (("forward", _COLOURS["F"]), ("loss", _COLOURS["L"]), ("backward", _COLOURS["B"]))]
    handles.append(Patch(facecolor=_COLOURS["allreduce"], alpha=_ALLREDUCE_ALPHA, label="stage all-reduce"))
    if highlight is not None and (visited := path_of(events, highlight)):
        skipped = sorted(stages - set(visited))
        handles.append(Patch(facecolor="white", edgecolor="black", linewidth=1.6,
                             label=f"microbatch {highlight}: stages\n{' > '.join(map(str, visited))}"
                                   f"\nskips {', '.join(map(str, skipped)) or 'none'}"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, borderaxespad=0,
              title="bar number = microbatch", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_bandwidth(path: str | Path, topology) -> None:
    """Heatmap of per-pair bandwidth (log scale), nodes labelled by name."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm
    import numpy as np

    bw = np.where(np.isinf(topology.bandwidth_gbit_s), np.nan, topology.bandwidth_gbit_s)
    n = topology.num_nodes
    fig, ax = plt.subplots(figsize=(min(14, 3 + 0.35 * n), min(12, 2.5 + 0.3 * n)))
    # A one-node topology has no links: LogNorm of an all-NaN matrix fails with "Invalid vmin or vmax".
    im = ax.imshow(bw, norm=LogNorm() if np.isfinite(bw).any() else None, cmap="viridis")
    if n <= 48:
        names = [node.name for node in topology.nodes]
        ax.set_xticks(range(n), names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), names, fontsize=7)
    fig.colorbar(im, ax=ax, label="bandwidth (Gbit/s)")
    ax.set_title(f"{topology.name}: bandwidth per pair")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
