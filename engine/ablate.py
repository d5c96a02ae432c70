"""`distill ablate`: the DistilBERT paper's ablation (Sanh et al. 2019, Table 4) on this engine's recipe.

Every variant is a `distill pretrain` run with the same teacher, data, masking, seed and budget (steps, batch size,
learning rate); only what its name says differs:

    triple       L_ce + L_mlm + L_cos: the options as given (each alpha > 0), student from teacher layers
    no-kd        --alpha-ce 0   (no distillation term: the student learns the masked words alone, plus the cosine)
    no-cos       --alpha-cos 0  (no cosine alignment of the last hidden states)
    no-mlm       --alpha-mlm 0  (no hard-label cross-entropy: the teacher's soft targets alone, plus the cosine)
    random-init  the triple loss, from a student of the same architecture with freshly initialized weights

Layout of `--out`: `run.json` (the ablation's options), `student_init/` (the student made from teacher layers, shared
by every variant but random-init), `student_random/`, `cache/` (the tokenized corpus, shared), one folder per
variant (a complete pretrain run: `run.json`, `metrics.jsonl`, `report.json`, `student/`), and the results:
`ablation.json`, `ablation.md` and `ablation.png`. Variants run one after another; a variant is finished when its
`report.json` exists, so `--resume` skips those and continues the interrupted one from its checkpoint.

The table gives each variant's held-out masked-token accuracy, perplexity and top-1 agreement with the teacher (all
on the same fixed held-out masks, `engine.evaluate.evaluate_mlm`) and each one's variation against the triple loss
(variant − triple). The paper's column is its variation of the GLUE macro-score after fine-tuning, a different
score: the signs are what to compare, and only with a BERT teacher, its corpus and its budget (README).
"""

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from engine import checkpoint as ckpt
from engine.atomic import atomic_write, write_json
from engine.config import ModelConfig
from engine.model import build_model
from engine.options import (
    ABLATION_VARIANTS,
    AblateOptions,
    DataOptions,
    MaskingOptions,
    ModelOptions,
    ObjectiveOptions,
    OptimOptions,
    RunOptions,
    to_dict,
)
from engine.pretrain import pretrain
from engine.report import format_table
from engine.runs import RUN_MARKER, prepare_out_dir, student_checkpoint


@dataclass(frozen=True)
class Variant:
    name: str
    losses: str  # the paper's notation: the three terms, ∅ for the one removed
    objective: dict = field(default_factory=dict)  # ObjectiveOptions fields it changes
    random_init: bool = False  # start from random weights instead of teacher layers
    paper: float | None = None  # Table 4: variation of the GLUE macro-score against the triple loss


VARIANTS = {
    v.name: v
    for v in (
        Variant("triple", "Lce - Lcos - Lmlm"),
        Variant("no-kd", "∅ - Lcos - Lmlm", {"alpha_ce": 0.0}, paper=-2.96),
        Variant("no-cos", "Lce - ∅ - Lmlm", {"alpha_cos": 0.0}, paper=-1.46),
        Variant("no-mlm", "Lce - Lcos - ∅", {"alpha_mlm": 0.0}, paper=-0.31),
        Variant("random-init", "triple loss + random weights init", random_init=True, paper=-3.69),
    )
}
assert tuple(VARIANTS) == ABLATION_VARIANTS
SCORES = ("mlm_accuracy", "perplexity", "top1_agreement")
# Options that may differ between an ablation and its --resume: how it runs, not what it computes.
_RUN_ONLY = {("run", "resume"), ("run", "overwrite"), ("run", "progress"), ("ablate", "variants")}


def parse_variants(names: list[str]) -> list[Variant]:
    """Variant names, given as separate words or comma-separated, in order, without repeats."""
    out = []
    for name in (n.strip() for item in names for n in item.split(",")):
        if name and name not in VARIANTS:
            raise ValueError(f"--variants: unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
        if name and VARIANTS[name] not in out:
            out.append(VARIANTS[name])
    if not out:
        raise ValueError(f"--variants: name at least one of {', '.join(VARIANTS)}")
    return out


def _check_triple(objective: ObjectiveOptions) -> None:
    """Every variant removes one term from the full triple loss: each weight must start above 0."""
    off = [f"--{k.replace('_', '-')}" for k in ("alpha_ce", "alpha_mlm", "alpha_cos") if getattr(objective, k) <= 0]
    if off:
        raise ValueError(
            f"{', '.join(off)} is 0: the ablation compares the full triple loss with one term removed, so every "
            "term's weight must be above 0"
        )


def _check_resumable(out: Path, record: dict) -> None:
    """A resumed ablation must compute what it started computing: a variant run under other options is not
    comparable with the finished ones."""
    marker = out / RUN_MARKER
    if not marker.is_file():
        return  # prepare_out_dir says what is missing
    before = json.loads(marker.read_text())
    changed = [
        f"--{key.replace('_', '-')} {before.get(section, {}).get(key)!r} -> {value!r}"
        for section, values in record.items()
        for key, value in values.items()
        if (section, key) not in _RUN_ONLY and before.get(section, {}).get(key) != value
    ]
    if changed:
        raise ValueError(
            f"--resume: {out} was started with other options ({'; '.join(changed)}); its variants would not be "
            "comparable. Resume with the same options, or start another --out"
        )


def random_student(like: Path, out_dir: Path, tokenizer_dir: Path, seed: int) -> Path:
    """A student with `like`'s architecture (its config.json) and freshly initialized weights, written once to
    `out_dir` (a resumed ablation finds it there).

    Initialization is `engine.model.init_weights` (as `transformers` initializes BERT): Linear and Embedding weights
    ~ N(0, initializer_range), biases 0, LayerNorm 1 and 0; drawn from `seed`.
    """
    if (out_dir / "config.json").is_file():
        return out_dir
    config = ModelConfig.from_pretrained(like)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(config, "mlm")
    return ckpt.save_model(model, out_dir, tokenizer_dir=tokenizer_dir)


def ablate(ab: AblateOptions, model_opts: ModelOptions, data: DataOptions, masking: MaskingOptions,
           objective: ObjectiveOptions, optim: OptimOptions, run: RunOptions) -> dict:  # fmt: skip
    """Run the variants of `ab.variants` one after another into `<run.out>/<variant>`; write and print the table.

    Returns:
        the table (also written to `<out>/ablation.json`): {"variants": {name: {"losses", "mlm_accuracy",
        "perplexity", "top1_agreement", "variation": {score: variant − triple} (when triple ran), "paper",
        "train_seconds", "report"}}, "teacher": {"mlm_accuracy", "perplexity"}, "markdown", "chart"}; or
        {"interrupted": True, "variant", "step"} when a signal stopped a variant.
    """
    variants = parse_variants(ab.variants)
    if not model_opts.teacher or not data.data:
        raise ValueError("--teacher and --data are required (the no-argument default pipeline sets both)")
    _check_triple(objective)
    record = to_dict(ab, model_opts, data, masking, objective, optim, run)
    if run.resume:
        _check_resumable(Path(run.out), record)
    out = prepare_out_dir(run.out, run.resume, run.overwrite, record)
    teacher_dir = Path(model_opts.teacher)
    m = model_opts
    student_dir = student_checkpoint(m.student, teacher_dir, out, m.student_arch, m.student_num_layers,
                                     m.student_layers)  # fmt: skip
    shared_data = replace(data, cache_dir=data.cache_dir or str(out / "cache"))  # tokenized once for all variants
    reports = {}
    for i, v in enumerate(variants, 1):
        vdir = out / v.name
        if (vdir / "report.json").is_file():
            print(f"[{i}/{len(variants)}] {v.name}: finished earlier, kept ({vdir / 'report.json'})")
            reports[v.name] = json.loads((vdir / "report.json").read_text())
            continue
        resume = (vdir / "checkpoint" / "trainer_state.pt").is_file()
        student = student_dir
        if v.random_init:
            student = random_student(student_dir, out / "student_random", teacher_dir, run.seed)
        print(f"[{i}/{len(variants)}] {v.name} ({v.losses}){': resumed' if resume else ''}")
        result = pretrain(
            replace(m, student=str(student)), shared_data, masking, replace(objective, **v.objective), optim,
            # A variant that never reached a checkpoint starts over (overwrite removes only a run of ours).
            replace(run, out=str(vdir), resume=resume, overwrite=not resume),
        )  # fmt: skip
        if result.get("interrupted"):
            print(f"ablation interrupted in {v.name}; finished variants are kept: rerun with --resume to continue")
            return {"interrupted": True, "variant": v.name, "step": result["step"]}
        reports[v.name] = result
    table = ablation_table(variants, reports)
    table.update(write_results(table, out, m.teacher, optim.steps))
    print(format_ablation(table))
    print(f"results: {out / 'ablation.json'}, {out / 'ablation.md'}" + (f", {table['chart']}" if table["chart"] else
          " (no chart: matplotlib is not installed)"))  # fmt: skip
    return table


def ablation_table(variants: list[Variant], reports: dict[str, dict]) -> dict:
    """The scores of each variant's `report.json` and their variation against the triple loss (variant − triple,
    in the scores' own units: fractions for accuracy and agreement)."""
    rows = {}
    for v in variants:
        r = reports[v.name]
        rows[v.name] = {
            "losses": v.losses,
            "mlm_accuracy": r["student"]["mlm_accuracy"],
            "perplexity": r["student"]["perplexity"],
            "top1_agreement": r["top1_agreement"],
            "paper": v.paper,
            "train_seconds": r.get("train_seconds"),
            "report": str(Path(r["student"]["path"]).parent / "report.json"),
        }
    if "triple" in rows:
        for row in rows.values():
            row["variation"] = {k: row[k] - rows["triple"][k] for k in SCORES}
    first = reports[variants[0].name]["teacher"]  # the same held-out masks for every variant
    return {"variants": rows, "teacher": {k: first[k] for k in ("mlm_accuracy", "perplexity")}}


def _rows(table: dict) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    header = ("variant", "losses", "MLM acc %", "Δ acc", "perplexity", "Δ ppl", "agreement %", "Δ agr", "paper Δ GLUE")
    rows = []
    for name, r in table["variants"].items():
        d = r.get("variation")
        rows.append((
            name, r["losses"],
            f"{100 * r['mlm_accuracy']:.2f}", f"{100 * d['mlm_accuracy']:+.2f}" if d else "—",
            f"{r['perplexity']:.1f}", f"{d['perplexity']:+.1f}" if d else "—",
            f"{100 * r['top1_agreement']:.2f}", f"{100 * d['top1_agreement']:+.2f}" if d else "—",
            f"{r['paper']:+.2f}" if r["paper"] is not None else "—",
        ))  # fmt: skip
    t = table["teacher"]
    rows.append(("(teacher)", "", f"{100 * t['mlm_accuracy']:.2f}", "", f"{t['perplexity']:.1f}", "", "", "", ""))
    return header, rows


def format_ablation(table: dict) -> str:
    """The printed table; Δ columns are variant − triple (accuracy and agreement in points)."""
    header, rows = _rows(table)
    return "\n".join([
        "held-out scores of each variant's student and their variation against the triple loss (variant − triple; "
        "points for accuracy and agreement); paper: Table 4, GLUE macro-score",
        format_table(rows, header),
    ])  # fmt: skip


def _markdown(table: dict, teacher: str, steps: int) -> str:
    header, rows = _rows(table)
    lines = [
        "# DistilBERT ablation (Sanh et al. 2019, Table 4)",
        "",
        f"Teacher `{teacher}`; every variant {steps} optimizer steps with the same data, seed and budget. Scores are "
        "the student's on the same held-out masks; Δ = variant − triple loss (points for accuracy and agreement). "
        "The paper's column is the variation of its GLUE macro-score after fine-tuning, not these scores.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
    ]
    return "\n".join(lines)


def write_results(table: dict, out: Path, teacher: str, steps: int) -> dict:
    """`ablation.json`, `ablation.md` and, with matplotlib, `ablation.png`; returns their paths."""
    md = out / "ablation.md"
    atomic_write(md, lambda f: f.write(_markdown(table, teacher, steps).encode()))
    chart = plot_ablation(table, out / "ablation.png")
    paths = {"markdown": str(md), "chart": str(chart) if chart else None}
    write_json(out / "ablation.json", {**table, **paths})
    return paths


def plot_ablation(table: dict, path: Path) -> Path | None:
    """One bar panel per score (accuracy, perplexity, agreement), a bar per variant with its Δ against the triple
    loss written above it; None (and no file) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = list(table["variants"])
    panels = (("mlm_accuracy", "held-out MLM accuracy %", 100, "+.2f"), ("perplexity", "perplexity", 1, "+.1f"),
              ("top1_agreement", "top-1 agreement with teacher %", 100, "+.2f"))  # fmt: skip
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (key, title, scale, fmt) in zip(axes, panels):
        values = [scale * table["variants"][n][key] for n in names]
        colors = ["tab:blue" if n == "triple" else "tab:gray" for n in names]
        bars = ax.bar(names, values, color=colors)
        for bar, n in zip(bars, names):
            d = table["variants"][n].get("variation")
            if d and n != "triple":
                ax.annotate(f"{scale * d[key]:{fmt}}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)  # fmt: skip
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("DistilBERT ablation: each variant against the triple loss (Δ above the bars)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
