"""Pictures of a run: a Chrome/Perfetto trace and a Gantt chart, one row per node."""
from __future__ import annotations

import json
from pathlib import Path

from topology.simulator import Event

_COLOURS = {"F": "#4c72b0", "B": "#dd8452", "L": "#55a868", "allreduce": "#c44e52"}


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


def plot_gantt(path: str | Path, events: list[Event], node_labels: list[str], title: str = "") -> None:
    """Compute bars coloured by kind (forward, loss, backward) and the stage all-reduce, one row per node."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = len(node_labels)
    fig, ax = plt.subplots(figsize=(12, max(2.5, 0.32 * rows + 1.2)))
    for e in events:
        if e.kind == "send":
            continue
        colour = _COLOURS["allreduce"] if e.kind == "allreduce" else _COLOURS[e.name[0]]
        ax.barh(e.node, e.end - e.start, left=e.start, height=0.8, color=colour,
                alpha=0.5 if e.kind == "allreduce" else 1.0, edgecolor="none")
    ax.set_yticks(range(rows), node_labels, fontsize=7 if rows > 24 else 9)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title(title)
    ax.legend(handles=[Patch(color=c, label=k) for k, c in
                       (("forward", _COLOURS["F"]), ("loss", _COLOURS["L"]), ("backward", _COLOURS["B"]),
                        ("all-reduce", _COLOURS["allreduce"]))], loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
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
