"""Compression speed and inference cost of the compressed modules, against dense, in one run.

    python benchmarks/compress_speed.py                          # CPU, 250000 x 1024, as the issue asks
    python benchmarks/compress_speed.py --device cuda --ae-epochs 30

Part 1, fitting: seconds for `svd:RANK` and `ae:RANK` (the autoencoder for --ae-epochs epochs at
the paper's batch size 32; seconds per epoch are printed too, so 30 epochs can be read off).
Part 2, inference: time of a lookup of --lookup-tokens ids and of tied logits for --logit-tokens
hidden states through each module (factorized svd, int8, int4, int4:g32), as a ratio to a dense
nn.Embedding / dense matmul on the same inputs. Medians of --repeats. The matrix is random
Gaussian (timing does not depend on its content). Writes JSON + Markdown next to --out.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from lmembed.common.files import write_json
from lmembed.common.report import markdown_table, write_text
from lmembed.common.runtime import pick_device
from lmembed.compression.api import run_pipeline
from lmembed.compression.registry import FitContext, parse_pipeline


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fit(method: str, weight: torch.Tensor, device: torch.device, seed: int):
    ctx = FitContext(seed=seed, device=device, progress=None)
    t0 = time.perf_counter()
    module = run_pipeline(parse_pipeline(method), weight, ctx, method)
    _sync(device)
    return module, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=250_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--ae-epochs", type=int, default=1)
    ap.add_argument("--lookup-tokens", type=int, default=16_384)
    ap.add_argument("--logit-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/bench-compress-speed")
    args = ap.parse_args()
    device = pick_device(args.device)
    g = torch.Generator().manual_seed(args.seed)
    weight = torch.randn(args.vocab, args.dim, generator=g) * 0.02
    print(f"matrix {args.vocab} x {args.dim} on {device}, torch threads {torch.get_num_threads()}")

    fits = []
    modules = {}
    for method in (f"svd:{args.rank}", f"ae:{args.rank}:epochs={args.ae_epochs}", "int8", "int4", "int4:g32"):
        module, seconds = fit(method, weight, device, args.seed)
        modules[method] = module.to(device)
        row = {"method": method, "fit_seconds": seconds, "stored_bytes": module.stored_bytes(),
               "ratio": weight.numel() * 4 / module.stored_bytes()}
        if method.startswith("ae:"):
            row["seconds_per_epoch"] = seconds / args.ae_epochs
        fits.append(row)
        print(f"fit {method:>20s}: {seconds:8.2f} s")

    w = weight.to(device)
    dense = torch.nn.Embedding.from_pretrained(w)
    ids = torch.randint(0, args.vocab, (args.lookup_tokens,), generator=g).to(device)
    h = (torch.randn(args.logit_tokens, args.dim, generator=g) * 0.02).to(device)
    with torch.no_grad():
        base_lookup = timed(lambda: dense(ids), device, args.repeats)
        base_logits = timed(lambda: h @ w.t(), device, args.repeats)
        speed = [{"module": "dense", "lookup_ms": 1e3 * base_lookup, "logits_ms": 1e3 * base_logits,
                  "lookup_vs_dense": 1.0, "logits_vs_dense": 1.0}]
        for name, m in modules.items():
            lk = timed(lambda m=m: m(ids), device, args.repeats)
            lg = timed(lambda m=m: m.logits(h), device, args.repeats)
            speed.append({"module": name, "lookup_ms": 1e3 * lk, "logits_ms": 1e3 * lg,
                          "lookup_vs_dense": lk / base_lookup, "logits_vs_dense": lg / base_logits})
    out = Path(args.out)
    result = {"vocab": args.vocab, "dim": args.dim, "rank": args.rank, "device": str(device),
              "threads": torch.get_num_threads(), "lookup_tokens": args.lookup_tokens,
              "logit_tokens": args.logit_tokens, "fits": fits, "speed": speed}
    write_json(out / "compress_speed.json", result)
    t1 = markdown_table(fits, ["method", "fit_seconds", "seconds_per_epoch", "stored_bytes", "ratio"])
    t2 = markdown_table(speed, ["module", "lookup_ms", "lookup_vs_dense", "logits_ms", "logits_vs_dense"])
    write_text(out / "compress_speed.md", f"# Compression speed: {args.vocab} x {args.dim} on {device}\n\n{t1}\n"
                                          f"Lookup of {args.lookup_tokens} ids, tied logits of {args.logit_tokens} "
                                          f"hidden states (time ratio to dense, lower is faster):\n\n{t2}")
    print(t1)
    print(t2)


if __name__ == "__main__":
    main()
