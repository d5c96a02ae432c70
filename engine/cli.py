"""`distill`: the command line, generated from the option dataclasses (`distill COMMAND --help`).

distill pretrain       DistilBERT-recipe distillation (no arguments: the bundled default pipeline)
distill adapt-head     give an encoder-only checkpoint an MLM head (makes the bundled teacher)
distill init-student   make a student from teacher layers (BERT → DistilBERT or shallower BERT)
"""

import argparse
import sys
from pathlib import Path

from engine import defaults
from engine.options import add_options, build_options

# The bundled default: sizes that finish on a 2-core CPU in about five minutes (README: "Quick start").
DEMO_TEACHER_RUN = "minilm-l6-mlm"
DEMO_ADAPT = {"steps": 60, "batch_size": 16, "max_seq_len": 64, "lr": 1e-2, "log_every": 10, "eval_batches": 10}
DEMO_PRETRAIN = {
    "student_num_layers": 3,
    "steps": 150,
    "batch_size": 16,
    "max_seq_len": 64,
    # The vocabulary head on masked rows only: on a CPU it would otherwise cost more than both encoders.
    "restrict_ce_to_mask": True,
    # The bundled teacher predicts little beyond token frequency (MiniLM is a sentence-embedding
    # model); masking weighted toward rare tokens would set its KD signal against the MLM term.
    "mlm_smoothing": 0.0,
    "log_every": 10,
    "eval_every": 50,
    "eval_batches": 10,
    "out": "runs/pretrain",
}


def _parser() -> argparse.ArgumentParser:
    from engine.pretrain import ADAPT_SECTIONS, SECTIONS

    parser = argparse.ArgumentParser(prog="distill", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("pretrain", help="distill a student with the DistilBERT triple loss")
    p.add_argument("--config", help="JSON or TOML file with options (sections or flat keys); flags win")
    add_options(p, *SECTIONS)
    p = sub.add_parser("adapt-head", help="train the MLM head of an encoder-only checkpoint")
    p.add_argument("--config", help="JSON or TOML file with options; flags win")
    add_options(p, *ADAPT_SECTIONS)
    p = sub.add_parser("init-student", help="initialize a student from teacher layers")
    p.add_argument("--teacher", required=True, help="teacher checkpoint folder (Hugging Face layout)")
    p.add_argument("--out", required=True, help="folder for the student checkpoint")
    p.add_argument("--layers", type=int, nargs="+", help="teacher layers to copy (default: spread evenly)")
    p.add_argument("--num-layers", type=int, help="student depth (default: half the teacher's)")
    p.add_argument("--arch", choices=("distilbert", "bert"), default="distilbert", help="student architecture")
    p.add_argument(
        "--fold-token-type",
        action="store_true",
        help="add the teacher's token-type-0 embedding to the positions (DistilBERT has none), so that the "
        "student's outputs equal the chosen teacher layers'; the original DistilBERT drops it",
    )
    from engine import finetune

    finetune.register(sub)  # `finetune` and `task`: each sets `func` (argparse.Namespace → exit code)
    return parser


def _bundled_teacher(args) -> Path:
    """The bundled MiniLM with a trained MLM head, made once and cached."""
    from engine.pretrain import ADAPT_SECTIONS, adapt_head

    run_dir = defaults.cache_dir() / DEMO_TEACHER_RUN
    model_dir = run_dir / "model"
    if (model_dir / "config.json").is_file():
        print(f"bundled teacher: {model_dir} (cached)")
        return model_dir
    print(f"bundled teacher: training an MLM head for all-MiniLM-L6-v2 once, cached in {run_dir}")
    profile = {
        **DEMO_ADAPT,
        "model": str(defaults.bundled_teacher_dir()),
        "data": [str(defaults.bbc_news_dir())],
        "out": str(run_dir),
        "overwrite": True,
        "device": args.device or "auto",
        "progress": args.progress if args.progress is not None else True,
    }
    adapt_head(*build_options(argparse.Namespace(), *ADAPT_SECTIONS, profile=profile))
    return model_dir


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if hasattr(args, "func"):
            return args.func(args)
        if args.command == "pretrain":
            from engine.pretrain import SECTIONS, pretrain

            profile = {}
            if args.teacher is None:  # the bundled default pipeline
                profile = {**DEMO_PRETRAIN, "teacher": str(_bundled_teacher(args))}
            if args.data is None:
                profile["data"] = [str(defaults.bbc_news_dir())]
            report = pretrain(*build_options(args, *SECTIONS, profile=profile))
            return 130 if report.get("interrupted") else 0
        if args.command == "adapt-head":
            from engine.pretrain import ADAPT_SECTIONS, adapt_head

            profile = {**DEMO_ADAPT, "out": "runs/adapt-head"}
            if args.model is None:
                profile["model"] = str(defaults.bundled_teacher_dir())
            if args.data is None:
                profile["data"] = [str(defaults.bbc_news_dir())]
            report = adapt_head(*build_options(args, *ADAPT_SECTIONS, profile=profile))
            return 130 if report.get("interrupted") else 0
        if args.command == "init-student":
            from engine.student import init_student

            path = init_student(
                args.teacher, args.out, layers=args.layers, num_layers=args.num_layers, arch=args.arch,
                fold_token_type=args.fold_token_type,
            )  # fmt: skip
            print(f"student written to {path}")
            return 0
    except (ValueError, OSError, ImportError) as e:  # our input errors; anything else keeps its traceback
        print(f"distill {args.command}: error: {e}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
