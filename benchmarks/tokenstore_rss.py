"""Peak memory and speed of building a token store (`engine.tokenstore`) from a generated corpus.

    python -m benchmarks.tokenstore_rss --mb 500 --workers 0

Generates `--mb` MB of text (the bundled BBC News articles' lines, shuffled and repeated, into files of `--file-mb`
MB each: one document a file, as a .txt corpus is read), then builds its store twice in a fresh process: the first
build tokenizes, the second must find the store. Prints one JSON line: sizes, seconds, tokens/s and the peak resident
memory of the building process above its baseline after imports (`ru_maxrss`) and of its largest worker. The test
`tests/engine/test_tokenstore.py` runs the same measurement on a smaller corpus.
"""

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, resource, sys, time
from engine.corpus import load_tokenizer
from engine.tokenstore import build_store
tok = load_tokenizer(sys.argv[1])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
store = build_store([sys.argv[2]], tok, sys.argv[3], 128, 12, workers=int(sys.argv[4]), progress=False)
built = time.perf_counter() - t0
t0 = time.perf_counter()
again = build_store([sys.argv[2]], tok, sys.argv[3], 128, 12, workers=int(sys.argv[4]), progress=False)
reused = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"tokens": store.meta["num_tokens"], "sequences": store.meta["num_sequences"],
                  "workers": store.meta["workers"], "build_s": round(built, 2), "reuse_s": round(reused, 2),
                  "tokens_per_s": store.meta["tokens_per_s"], "reused_same_store": again.folder == store.folder,
                  "baseline_rss_mb": round(base / 1024, 1),
                  "peak_rss_above_baseline_mb": round((peak - base) / 1024, 1),
                  "largest_worker_rss_mb": round(child / 1024, 1)}))
"""


def generate_corpus(folder: Path, mb: float, file_mb: float = 50.0, seed: int = 0) -> Path:
    """`mb` MB of English news text in .txt files of about `file_mb` MB (lines of the bundled BBC News, shuffled)."""
    from engine.defaults import bbc_news_dir

    lines = [
        line
        for p in sorted(bbc_news_dir().rglob("*.txt"))
        for line in p.read_bytes().decode("utf-8", "replace").splitlines()
        if line.strip()
    ]
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    target, written, index = int(mb * 1e6), 0, 0
    while written < target:
        size = min(int(file_mb * 1e6), target - written)
        with open(folder / f"part-{index:04d}.txt", "w") as f:
            n = 0
            while n < size:
                line = rng.choice(lines) + "\n"
                f.write(line)
                n += len(line.encode())
        written += n
        index += 1
    return folder


def measure(corpus: Path, cache: Path, tokenizer_dir: Path, workers: int = 0) -> dict:
    """Build the store of `corpus` twice in a fresh process; its figures (see the module docstring)."""
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tokenizer_dir), str(corpus), str(cache), str(workers)],
        capture_output=True, text=True, cwd=ROOT, check=True,
    )  # fmt: skip
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["text_mb"] = round(sum(p.stat().st_size for p in corpus.rglob("*.txt")) / 1e6, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=500.0, help="corpus size in MB")
    parser.add_argument("--file-mb", type=float, default=50.0, help="size of each generated .txt file")
    parser.add_argument("--workers", type=int, default=0, help="tokenizing processes (0: one per core)")
    parser.add_argument("--tokenizer", default="", help="tokenizer folder (default: the bundled MiniLM's)")
    args = parser.parse_args()
    from engine.defaults import bundled_teacher_dir

    tokenizer_dir = Path(args.tokenizer) if args.tokenizer else bundled_teacher_dir()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = generate_corpus(Path(tmp) / "corpus", args.mb, args.file_mb)
        print(json.dumps(measure(corpus, Path(tmp) / "cache", tokenizer_dir, args.workers)))


if __name__ == "__main__":
    main()
