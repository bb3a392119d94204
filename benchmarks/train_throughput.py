"""Tokens/s of lmembed's training loop vs a minimal plain-PyTorch loop: same model, data, run.

    python benchmarks/train_throughput.py                                   # CPU: lstm small, tied
    python benchmarks/train_throughput.py --configs lstm:medium,transformer:small --ties tied,none \\
        --tokens 2000000 --device cuda                                      # the GPU suite (one run)

The plain loop is pytorch/examples' word_language_model loop: slice, forward, fp32 logits, mean
cross-entropy, backward, clip, step (torch.optim defaults). lmembed's loop is the trainer's own
epoch function with its settings: bf16 autocast and fused AdamW on CUDA, optional torch.compile
(--compile) and chunked softmax (--ce-chunk). Both see the same first --tokens training tokens
from the same initial weights; after the pass each model's validation perplexity is measured
with the same evaluation code, so a speed-up cannot hide a worse model. Timings are medians of
--repeats passes; peak memory is torch.cuda.max_memory_allocated (GPU only).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import lmembed
from lmembed.common.files import write_json
from lmembed.common.report import markdown_table, write_text
from lmembed.common.runtime import pick_device
from lmembed.data.batching import StreamBatches
from lmembed.data.bundled import TextOptions
from lmembed.evaluation.perplexity import lm_nll, ppl
from lmembed.models import build_model
from lmembed.training.dist import DistEnv
from lmembed.training.lm import _train_epoch
from lmembed.training.loop import make_optimizer


def plain_loop(model, ids: np.ndarray, cfg, device) -> float:
    """Minimal reference loop in fp32; returns tokens/s."""
    b = cfg.batch_size
    n = len(ids) // b
    data = torch.from_numpy(np.asarray(ids[: b * n], dtype=np.int64)).view(b, n).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr) if cfg.optimizer == "sgd" else \
        torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    model.train()
    state, tokens = None, 0
    _sync(device)
    t0 = time.perf_counter()
    for i in range(0, n - 1, cfg.bptt):
        x, y = data[:, i : i + cfg.bptt], data[:, i + 1 : i + 1 + cfg.bptt]
        x = x[:, : y.shape[1]]
        logits, state = model(x, state)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad()
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
    step_model = torch.compile(model) if cfg.compile else model
    _sync(device)
    return _train_epoch(step_model, model, opt, batches, cfg, 1, device, False, DistEnv(), Path("."))["tokens_per_s"]


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(cfg, corpus, tokens: int, eval_tokens: int, repeats: int, device, seed: int) -> dict:
    ids = corpus.train[:tokens]
    valid = corpus.valid[:eval_tokens]
    row: dict = {"arch": cfg.arch, "preset": cfg.preset, "tie": cfg.tie, "tokens": int(len(ids))}
    for name in ("plain", "lmembed"):
        speeds = []
        for r in range(repeats):
            torch.manual_seed(seed)
            model = build_model(cfg, corpus.vocab_size).to(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            speeds.append(plain_loop(model, ids, cfg, device) if name == "plain" else
                          lmembed_loop(model, ids, cfg, device))
            if r == 0:
                if device.type == "cuda":
                    row[f"{name}_peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
                nll, n = lm_nll(model, valid, batch_size=cfg.eval_batch_size, bptt=cfg.bptt, device=device,
                                amp="off")
                row[f"{name}_valid_ppl"] = ppl(nll, n)
            del model
        row[f"{name}_tokens_per_s"] = statistics.median(speeds)
        row[f"{name}_runs"] = speeds
    row["ratio"] = row["lmembed_tokens_per_s"] / row["plain_tokens_per_s"]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="lstm:small", help="comma-separated ARCH:PRESET")
    ap.add_argument("--ties", default="tied", help="comma-separated tie modes")
    ap.add_argument("--data", default="shakespeare")
    ap.add_argument("--tokens", type=int, default=60000, help="training tokens per timed pass")
    ap.add_argument("--eval-tokens", type=int, default=20000, help="validation tokens scored after the pass")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--amp", default="auto")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--ce-chunk", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/bench-throughput")
    args = ap.parse_args(argv)

    device = pick_device(args.device)
    rows = []
    corpus = None
    for spec in args.configs.split(","):
        arch, preset = spec.split(":")
        for tie in args.ties.split(","):
            cfg = lmembed.make_config(arch, preset, tie=tie, data=args.data, seed=args.seed, amp=args.amp,
                                      device=str(device), ce_chunk=args.ce_chunk, compile=args.compile)
            if corpus is None:
                corpus = lmembed.load_corpus(args.data, options=TextOptions.of(cfg))
            cfg = dataclasses.replace(cfg, max_steps=None)
            row = measure(cfg, corpus, args.tokens, args.eval_tokens, args.repeats, device, args.seed)
            row.update(device=str(device), amp=args.amp if device.type == "cuda" else "off", compile=args.compile,
                       ce_chunk=args.ce_chunk)
            rows.append(row)
            print(f"{arch}/{preset} {tie}: plain {row['plain_tokens_per_s']:,.0f} tok/s, lmembed "
                  f"{row['lmembed_tokens_per_s']:,.0f} tok/s, ratio {row['ratio']:.2f}", flush=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None, "command": sys.argv}
    out = Path(args.out)
    name = f"throughput-{device.type}"
    write_json(out / f"{name}.json", {"rows": rows, **meta})
    cols = ["arch", "preset", "tie", "plain_tokens_per_s", "lmembed_tokens_per_s", "ratio", "plain_valid_ppl",
            "lmembed_valid_ppl"]
    if device.type == "cuda":
        cols += ["plain_peak_mem_gb", "lmembed_peak_mem_gb"]
    table = markdown_table(rows, cols)
    write_text(out / f"{name}.md", f"# Training throughput: lmembed vs a plain PyTorch loop ({device})\n\n{table}")
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
