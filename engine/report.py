"""Run reports: a printed table, the loss-curve PNG and the metrics history (JSON goes through engine.atomic)."""

import json
from pathlib import Path


def format_table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


TERM_LABELS = {"kd": "KD (KL at T, ×T²)", "mlm": "MLM cross-entropy", "cos": "1 − cosine", "ce": "label cross-entropy"}


def plot_curves(history: list[dict], path: Path, keys=("loss", "kd", "mlm", "cos")) -> Path | None:
    """Loss curves against the step as a PNG, on linear axes so that a fall shows: left, the weighted total the
    optimizer minimizes; right, each unweighted term relative to its first logged value (1.0 = where it started).

    Returns None, with one line saying why and how to get the plot, when matplotlib is not installed.
    """
    lines = [h for h in history if "loss" in h]
    if not lines:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"loss plot skipped: matplotlib is not installed (pip install matplotlib); {Path(path).name} not written")
        return None
    steps = [h["step"] for h in lines]
    fig, (total, terms) = plt.subplots(1, 2, figsize=(10, 4))
    total.plot(steps, [h["loss"] for h in lines], color="black")
    total.set_title("total loss (weighted sum of the terms)")
    shown = [k for k in keys if k != "loss" and any(h.get(k) for h in lines)]
    for k in shown:
        first = next((h[k] for h in lines if h.get(k)), None)
        label = f"{TERM_LABELS.get(k, k)}: {first:.4g}"
        terms.plot(steps, [h.get(k, float("nan")) / first for h in lines], label=label)
    terms.set_title("each term, unweighted, relative to its first value")
    terms.axhline(1.0, color="grey", lw=0.5)
    if shown:
        terms.legend(title="term: first value", fontsize=8)
    for ax in (total, terms):
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read_history(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
