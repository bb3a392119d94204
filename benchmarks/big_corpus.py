"""The memmap path is real: a 100M-token Zipfian corpus with 250k word types trains on CPU in bounded RSS.

    python benchmarks/big_corpus.py                      # 100M tokens, 250k types, 200 steps
    python benchmarks/big_corpus.py --tokens 2000000     # quick look

Generates the corpus (PTB layout, words `w<rank>`), then runs `lmembed train` in a child process
(tokenisation into the memory-mapped cache + a bounded number of training steps of a small tied
LSTM with the chunked softmax) and reports the child's peak RSS from the kernel (ru_maxrss), the
time of each phase, and whether the 4 GB budget held. JSON + Markdown go to --out.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from lmembed.common.files import write_json
from lmembed.common.report import markdown_table, write_text


def generate(root: Path, tokens: int, types: int, seed: int, line_len: int = 25) -> dict:
    """PTB-layout corpus with Zipf(1) unigram frequencies over `types` words."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, types + 1)
    cdf = np.cumsum(p / p.sum())
    words = np.array([f"w{i}" for i in range(types)], dtype=object)
    sizes = {"train": tokens, "valid": max(10_000, tokens // 1000), "test": max(10_000, tokens // 1000)}
    for split, n in sizes.items():
        with open(root / f"ptb.{split}.txt", "w") as f:
            done = 0
            while done < n:
                k = min(1_000_000, n - done)
                ids = np.searchsorted(cdf, rng.random(k), side="right").clip(max=types - 1)
                w = words[ids]
                f.write("\n".join(" ".join(w[i : i + line_len]) for i in range(0, k, line_len)) + "\n")
                done += k
    return sizes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=100_000_000)
    ap.add_argument("--types", type=int, default=250_000)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--budget-gb", type=float, default=4.0)
    ap.add_argument("--workdir", default="runs/big-corpus/data", help="where the generated corpus goes (reused)")
    ap.add_argument("--out", default="runs/big-corpus")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    data, out = Path(args.workdir), Path(args.out)
    marker = data / "generated.json"
    spec = {"tokens": args.tokens, "types": args.types, "seed": args.seed}
    t0 = time.perf_counter()
    if not marker.exists() or json.loads(marker.read_text()) != spec:
        generate(data, args.tokens, args.types, args.seed)
        marker.write_text(json.dumps(spec))
    gen_s = time.perf_counter() - t0

    run = out / "run"
    cmd = [sys.executable, "-m", "lmembed", "train", "--data", str(data), "--preset", "tiny", "--tie", "tied",
           "--emb-dim", "64", "--hidden", "64", "--batch-size", "32", "--bptt", "35", "--eval-batch-size", "32",
           "--epochs", "1", "--max-steps", str(args.steps), "--ce-chunk", "256", "--seed", str(args.seed),
           "--device", "cpu", "--out", str(run), "--force", "--no-progress"]
    t1 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    child_s = time.perf_counter() - t1
    if res.returncode != 0:
        print(res.stderr[-3000:], file=sys.stderr)
        return res.returncode
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9  # Linux: KiB
    metrics = json.loads((run / "metrics.json").read_text())
    row = {"train_tokens": metrics["train_tokens"], "vocab_size": metrics["vocab_size"], "steps": args.steps,
           "generate_s": gen_s, "child_s": child_s, "train_s": metrics["train_seconds"],
           "tokens_per_s": metrics["tokens_per_s"], "valid_ppl": metrics["valid_ppl"], "peak_rss_gb": peak_gb,
           "budget_gb": args.budget_gb, "within_budget": peak_gb <= args.budget_gb, "command": " ".join(cmd[1:])}
    write_json(out / "big_corpus.json", row)
    table = markdown_table([row], ["train_tokens", "vocab_size", "steps", "generate_s", "child_s", "train_s",
                                   "tokens_per_s", "peak_rss_gb", "within_budget"])
    write_text(out / "big_corpus.md", f"# 100M-token corpus through the memmap path\n\n{table}")
    print(table, end="")
    return 0 if row["within_budget"] else 1


if __name__ == "__main__":
    sys.exit(main())
