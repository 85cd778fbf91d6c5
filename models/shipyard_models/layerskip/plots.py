"""The per-layer exit chart the platform logs with a finished run: loss and agreement by exit layer."""
from __future__ import annotations

import re
from pathlib import Path


def exit_table(metrics: dict[str, float], prefix: str = "val/") -> list[tuple[int, float, float]]:
    """(layer, exit loss in nats, top-1 agreement with the last layer) rows from logged metrics."""
    rows = {}
    for key, value in metrics.items():
        m = re.fullmatch(re.escape(prefix) + r"(exit_loss|agree)/l(\d+)", key)
        if m:
            rows.setdefault(int(m.group(2)), {})[m.group(1)] = float(value)
    return [(l, r["exit_loss"], r["agree"]) for l, r in sorted(rows.items()) if len(r) == 2]


def exit_plots(metrics: dict[str, float], out_dir: Path) -> list[Path]:
    rows = exit_table(metrics)
    if not rows:
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    layers, losses, agree = zip(*rows)
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.2), dpi=120)
    a.plot(layers, losses, marker="o")
    a.set(xlabel="exit after layer", ylabel="validation loss (nats)", title="early-exit loss")
    b.plot(layers, agree, marker="o", color="tab:green")
    b.set(xlabel="exit after layer", ylabel="top-1 agreement", title="agreement with the last layer", ylim=(0, 1.02))
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(out_dir) / "exit_layers.png"
    fig.savefig(path)
    plt.close(fig)
    return [path]
