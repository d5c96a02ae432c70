"""Run reports: the output-folder guard, a JSON report, a printed table and a loss-curve PNG."""

import json
import os
import shutil
from pathlib import Path

RUN_MARKER = "run.json"


def prepare_out_dir(out: str | Path, resume: bool, overwrite: bool, record: dict) -> Path:
    """Create or reuse the output folder without clobbering another run.

    A folder that holds a run (its `run.json`) is refused unless `resume` (continue it) or
    `overwrite` (delete it) is given. Anything else non-empty is refused too: we never delete files
    we did not write.
    """
    out = Path(out)
    marker = out / RUN_MARKER
    if resume:
        if not marker.is_file():
            raise FileNotFoundError(f"--resume: {out} holds no run to continue ({RUN_MARKER} is missing)")
        return out
    if out.exists() and any(out.iterdir()):
        if not marker.is_file():
            raise FileExistsError(f"{out} is not empty and holds no run of ours; choose another --out")
        if not overwrite:
            raise FileExistsError(
                f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(marker, record)
    return out


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


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
