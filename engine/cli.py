"""`distill`: the command line. Every command is registered the same way, from its option dataclasses
(`engine.options`), and runs the same way: options built (defaults ← profile ← --config file ← flags), the
command's function called, its report's `interrupted` turned into exit code 130. Every error ends in one line,
`distill COMMAND: error: …`: bad input (and a full disk) with exit code 2, anything else with 1; `distill --debug
COMMAND` shows the traceback instead.

Nothing here imports torch: `distill --help` answers at once; a command imports its module when it runs.
"""

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

from engine import defaults
from engine.options import (
    ABLATE_SECTIONS,
    ADAPT_SECTIONS,
    CACHE_TEACHER_SECTIONS,
    FINETUNE_SECTIONS,
    INIT_STUDENT_SECTIONS,
    PEEK_SECTIONS,
    PRETRAIN_SECTIONS,
    TASK_SECTIONS,
    add_options,
    build_options,
    check_fsdp,
)


def _pretrain(args: argparse.Namespace) -> dict:
    from engine.pretrain import bundled_teacher, pretrain

    bundled = args.teacher is None
    profile = dict(defaults.DEMO_PRETRAIN) if bundled else {}
    if args.data is None:
        profile["data"] = [str(defaults.bbc_news_dir())]
    options = build_options(args, *PRETRAIN_SECTIONS, profile=profile)
    check_fsdp(options[-1], "pretrain", options[0].teacher_cache)  # before the bundled teacher's head is trained
    if bundled and not options[0].teacher_cache:  # from a cache, the teacher is the one it names
        options[0].teacher = str(bundled_teacher(options[-1]))
    return pretrain(*options)


def _adapt_head(args: argparse.Namespace) -> dict:
    from engine.pretrain import adapt_head

    profile = {**defaults.DEMO_ADAPT, "out": "runs/adapt-head"}
    if args.model is None:
        profile["model"] = str(defaults.bundled_teacher_dir())
    if args.data is None:
        profile["data"] = [str(defaults.bbc_news_dir())]
    return adapt_head(*build_options(args, *ADAPT_SECTIONS, profile=profile))


def _bundled_task(args: argparse.Namespace, fields: tuple[str, ...]) -> bool:
    """The no-argument default applies when none of the models and data are named (other flags may be)."""
    if not all(getattr(args, f, None) is None for f in fields):
        return False
    if getattr(args, "task", None) not in (None, "classification"):
        raise ValueError(
            f"the bundled default is BBC News classification; for --task {args.task} give its data and models "
            f"({' / '.join('--' + f for f in fields)})"
        )
    return True


def _finetune(args: argparse.Namespace) -> dict:
    from engine.finetune import finetune

    profile = {**defaults.FINETUNE_PROFILE, "out": "runs/finetune", "model": str(defaults.bundled_teacher_dir())}
    if _bundled_task(args, ("model", "data")):
        profile.update(defaults.DEMO_TASK_TEACHER, task="classification", data=[str(defaults.bbc_news_dir())])
    return finetune(*build_options(args, *FINETUNE_SECTIONS, profile=profile))


def _task(args: argparse.Namespace) -> dict:
    from engine.finetune import bundled_teacher, distill_task

    profile = {**defaults.FINETUNE_PROFILE, "out": "runs/task"}
    bundled = _bundled_task(args, ("teacher", "student", "data"))
    if bundled:
        profile.update(defaults.DEMO_TASK, task="classification", student_from=str(defaults.bundled_teacher_dir()),
                       data=[str(defaults.bbc_news_dir())])  # fmt: skip
    opts, data, kd, optim, run = build_options(args, *TASK_SECTIONS, profile=profile)
    if bundled:
        opts.teacher = str(bundled_teacher(data, run))
    return distill_task(opts, data, kd, optim, run)


def _cache_teacher(args: argparse.Namespace) -> dict:
    from engine.teacher_cache import cache_teacher

    profile = {"out": "runs/teacher-cache"}
    if args.teacher is None and args.data is None:  # the bundled teachers and data, sized as their demos
        if getattr(args, "task", None) == "mlm":
            from engine.pretrain import bundled_teacher

            data = [str(defaults.bbc_news_dir())]
            profile = {**defaults.DEMO_PRETRAIN, "out": "runs/teacher-cache-mlm", "data": data}
            options = build_options(args, *CACHE_TEACHER_SECTIONS, profile=profile)
            options[0].teacher = str(bundled_teacher(options[-1]))
            return cache_teacher(*options)
        from engine.finetune import bundled_teacher

        _bundled_task(args, ("teacher", "data"))  # QA has no bundled default: a clear error
        profile.update(defaults.DEMO_TASK, out="runs/teacher-cache", data=[str(defaults.bbc_news_dir())])
        options = build_options(args, *CACHE_TEACHER_SECTIONS, profile=profile)
        options[0].teacher = str(bundled_teacher(options[1], options[-1]))
        return cache_teacher(*options)
    return cache_teacher(*build_options(args, *CACHE_TEACHER_SECTIONS, profile=profile))


def _init_student(args: argparse.Namespace) -> dict:
    from engine.student import init_student

    (o,) = build_options(args, *INIT_STUDENT_SECTIONS)
    if not o.teacher or not o.out:
        raise ValueError("--teacher and --out are required")
    path = init_student(o.teacher, o.out, layers=o.layers or None, num_layers=o.num_layers or None, arch=o.arch,
                        fold_token_type=o.fold_token_type)  # fmt: skip
    print(f"student written to {path}")
    return {"student": str(path)}


# The dark-knowledge example of distillation tutorials: `distill peek` with no --text.
_PEEK_EXAMPLE = {
    "text": "i completed writing my [MASK]",
    "candidates": ["homework", "cake", "assignment", "car", "book"],
}


def _peek(args: argparse.Namespace) -> dict:
    from engine.options import RunOptions
    from engine.peek import peek
    from engine.pretrain import bundled_teacher

    (o,) = build_options(args, *PEEK_SECTIONS)
    if not o.text:
        (o,) = build_options(args, *PEEK_SECTIONS, profile=_PEEK_EXAMPLE)
    if not o.model:
        o.model = str(bundled_teacher(RunOptions(device=o.device)))
    return peek(o)


def _ablate(args: argparse.Namespace) -> dict:
    from engine.ablate import ablate
    from engine.pretrain import bundled_teacher

    profile = {"out": "runs/ablate"}
    if args.data is None:
        profile["data"] = [str(defaults.bbc_news_dir())]
    options = build_options(args, *ABLATE_SECTIONS, profile=profile)
    if not options[1].teacher:  # the bundled demo, with the profile `distill pretrain` uses for it
        options = build_options(args, *ABLATE_SECTIONS, profile={**defaults.DEMO_PRETRAIN, **profile})
        options[1].teacher = str(bundled_teacher(options[-1]))
    return ablate(*options)


@dataclass
class Command:
    name: str
    help: str  # one line in `distill --help`
    sections: tuple  # the option dataclasses, in --help order
    run: Callable[[argparse.Namespace], dict]  # → report; {"interrupted": True, ...} when stopped by a signal
    profile: dict | None = None  # the command's own defaults, shown in --help
    note: str = ""  # what running with no arguments does


_DEMO_PRETRAIN_NOTE = (
    "With no --teacher: the bundled demo (MiniLM teacher with a head trained once, BBC News) with its CPU profile: "
    + ", ".join(f"{k} {v}" for k, v in defaults.DEMO_PRETRAIN.items() if k != "out")
    + "."
)
COMMANDS = [
    Command("pretrain", "distill a student with the DistilBERT triple loss (no arguments: the bundled demo)",
            PRETRAIN_SECTIONS, _pretrain, note=_DEMO_PRETRAIN_NOTE),
    Command("adapt-head", "train the MLM head of an encoder-only checkpoint (makes the bundled teacher)",
            ADAPT_SECTIONS, _adapt_head, {**defaults.DEMO_ADAPT, "out": "runs/adapt-head"},
            "With no --model/--data: the bundled MiniLM on BBC News."),
    Command("init-student", "initialize a student from teacher layers (BERT -> DistilBERT or shallower BERT)",
            INIT_STUDENT_SECTIONS, _init_student),
    Command("cache-teacher", "run a teacher once and store its top-K outputs, to distill from with --teacher-cache",
            CACHE_TEACHER_SECTIONS, _cache_teacher, {"out": "runs/teacher-cache"},
            "Classification and QA store whole rows (exact); mlm stores --mask-copies fixed masked copies of each "
            "sequence (static masking). With no --teacher/--data: the bundled teacher of `distill task` (or, with "
            "--task mlm, of `distill pretrain`) on BBC News, with that command's demo data settings."),
    Command("finetune", "fine-tune a checkpoint for classification or QA (makes teachers; no arguments: the demo)",
            FINETUNE_SECTIONS, _finetune, {**defaults.FINETUNE_PROFILE, "out": "runs/finetune"},
            "With no --model/--data: MiniLM on BBC News with " + ", ".join(
                f"{k} {v}" for k, v in defaults.DEMO_TASK_TEACHER.items()) + "."),
    Command("task", "task-specific distillation from a fine-tuned teacher (no arguments: the bundled demo)",
            TASK_SECTIONS, _task, {**defaults.FINETUNE_PROFILE, "out": "runs/task"},
            "With no --teacher/--student/--data: the bundled story (MiniLM teacher fine-tuned once on BBC News, "
            "a 3-layer student, a baseline without a teacher) with " + ", ".join(
                f"{k} {v}" for k, v in defaults.DEMO_TASK.items() if k != "out") + "."),
    Command("peek", "a masked word's distribution at several temperatures (dark knowledge; no arguments: the example)",
            PEEK_SECTIONS, _peek,
            note=f"With no --text: {_PEEK_EXAMPLE['text']!r} with the candidates "
                 f"{' '.join(_PEEK_EXAMPLE['candidates'])}. With no --model: the bundled teacher (MiniLM with its MLM "
                 "head, trained once and cached)."),
    Command("ablate", "the DistilBERT loss ablation: each term removed, random init (no arguments: the bundled demo)",
            ABLATE_SECTIONS, _ablate, {"out": "runs/ablate"},
            "Each variant is a `distill pretrain` run in <out>/<variant>, all with the same data, seed and budget; "
            "--resume continues an interrupted ablation without rerunning finished variants. With no --teacher: the "
            "bundled demo with the CPU profile of `distill pretrain`: " + ", ".join(
                f"{k} {v}" for k, v in defaults.DEMO_PRETRAIN.items() if k != "out") + " (per variant)."),
]  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    summary = "\n".join(f"  {c.name:<13} {c.help}" for c in COMMANDS)
    parser = argparse.ArgumentParser(
        prog="distill",
        description=f"Knowledge distillation of BERT-family models on custom kernels.\n\ncommands:\n{summary}\n\n"
        "`distill COMMAND --help` lists a command's options with their defaults.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for c in COMMANDS:
        p = sub.add_parser(c.name, description=c.help + ("\n\n" + c.note if c.note else ""),
                           formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        if c.sections != INIT_STUDENT_SECTIONS:
            p.add_argument("--config", help="JSON or TOML file with options (sections or flat keys); flags win")
        add_options(p, *c.sections, profile=c.profile)
        p.set_defaults(command_spec=c)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error, already printed in one line (2)
        return int(e.code or 0)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        report = args.command_spec.run(args)
    except KeyboardInterrupt:  # Ctrl-C before training began (a guarded command leaves nothing behind)
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, ImportError) as e:  # bad input, a missing file, a full disk
        if args.debug:
            raise
        print(f"distill {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug, or the machine's (out of memory): one line too, and how to see more
        if args.debug:
            raise
        print(f"distill {args.command}: error: {type(e).__name__}: {_one_line(e)} (--debug shows the traceback)",
              file=sys.stderr)  # fmt: skip
        return 1
    return 130 if report.get("interrupted") else 0


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    raise SystemExit(main())
