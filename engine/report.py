"""Run reports: a printed table, the loss-curve PNG and the metrics history (JSON goes through engine.atomic)."""

import json
from pathlib import Path


def format_table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def plot_curves(history: list[dict], path: Path, keys=("loss", "kd", "mlm", "cos")) -> Path | None:
    """Loss curves against the step as a PNG; None (and no file) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    lines = [h for h in history if "loss" in h]
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [h["step"] for h in lines]
    for k in keys:
        if any(h.get(k) for h in lines):
            ax.plot(steps, [h.get(k, float("nan")) for h in lines], label=k)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read_history(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
