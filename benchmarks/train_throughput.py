"""Tokens/s of lmembed's training loop vs a minimal plain-PyTorch loop, same model, same data, same run.

    python benchmarks/train_throughput.py --arch lstm --preset small --tokens 60000
    python benchmarks/train_throughput.py --arch transformer --preset small --device cuda --amp bf16

The plain loop is the pytorch/examples word_language_model loop: slice, forward, mean CE,
backward, clip, step. Both run alternately `--repeats` times; the medians are compared.
Prints a table and writes JSON + Markdown to --out.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import lmembed
from lmembed.data.batching import StreamBatches
from lmembed.evaluate.perplexity import autocast_for
from lmembed.models import build_model
from lmembed.report import markdown_table, write_text
from lmembed.train import _train_epoch, make_optimizer, text_options
from lmembed.utils import pick_device, write_json


def plain_loop(model, ids: np.ndarray, cfg, device, amp: str) -> float:
    """Minimal reference loop; returns tokens/s."""
    b = cfg.batch_size
    n = len(ids) // b
    data = torch.from_numpy(np.asarray(ids[: b * n], dtype=np.int64)).view(b, n).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr) if cfg.optimizer == "sgd" else \
        torch.optim.AdamW(model.parameters(), lr=cfg.lr, fused=device.type == "cuda")
    model.train()
    state, tokens = None, 0
    _sync(device)
    t0 = time.perf_counter()
    for i in range(0, n - 1, cfg.bptt):
        x, y = data[:, i : i + cfg.bptt], data[:, i + 1 : i + 1 + cfg.bptt]
        x = x[:, : y.shape[1]]
        with autocast_for(device, amp):
            logits, state = model(x, state)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        state = model.detach_state(state)
        tokens += y.numel()
    _sync(device)
    return tokens / (time.perf_counter() - t0)


def lmembed_loop(model, ids: np.ndarray, cfg, device) -> float:
    batches = StreamBatches(ids, cfg.batch_size, cfg.bptt)
    opt = make_optimizer(cfg, model, device)
    _sync(device)
    return _train_epoch(model, opt, batches, cfg, 1, device, progress=False)["tokens_per_s"]


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="lstm")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--tie", default="tied")
    ap.add_argument("--data", default="shakespeare")
    ap.add_argument("--tokens", type=int, default=60000, help="training tokens per timed pass")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--amp", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/bench-throughput")
    args = ap.parse_args(argv)

    device = pick_device(args.device)
    cfg = lmembed.make_config(args.arch, args.preset, tie=args.tie, data=args.data, seed=args.seed, amp=args.amp,
                              device=str(device))
    corpus = lmembed.load_corpus(args.data, options=text_options(cfg))
    ids = corpus.train[: args.tokens]
    torch.manual_seed(args.seed)
    results = {"lmembed": [], "plain": []}
    for _ in range(args.repeats):
        for name in ("plain", "lmembed"):
            torch.manual_seed(args.seed)
            model = build_model(cfg, corpus.vocab_size).to(device)
            tps = plain_loop(model, ids, cfg, device, cfg.amp) if name == "plain" else lmembed_loop(model, ids, cfg,
                                                                                                     device)
            results[name].append(tps)
    med = {k: statistics.median(v) for k, v in results.items()}
    row = {"arch": args.arch, "preset": args.preset, "tie": args.tie, "device": str(device),
           "amp": cfg.amp if device.type == "cuda" else "off", "tokens": len(ids),
           "plain_tokens_per_s": med["plain"], "lmembed_tokens_per_s": med["lmembed"],
           "ratio": med["lmembed"] / med["plain"], "runs": results, "torch": torch.__version__,
           "threads": torch.get_num_threads()}
    out = Path(args.out)
    name = f"{args.arch}-{args.preset}-{args.tie}-{device.type}"
    write_json(out / f"{name}.json", row)
    table = markdown_table([row], ["arch", "preset", "tie", "device", "amp", "plain_tokens_per_s",
                                   "lmembed_tokens_per_s", "ratio"])
    write_text(out / f"{name}.md", f"# Training throughput: lmembed vs plain PyTorch loop\n\n{table}")
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
