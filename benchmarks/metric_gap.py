"""How much of a calibrated GGUF rounding's loss is the calibration's, not the format's.

    python benchmarks/metric_gap.py --out runs/metric_gap          # about 6 min on 2 cores

SmolLM2's token matrix is rounded into one llama.cpp block type (calibrated rounding, exactly as
`lmembed compress --bits B --out x.gguf` does it) under the metric M = H + G built from each
calibration source in turn, and once under an *oracle*: H taken from the scored text itself (no
user has it; it bounds what any calibration text could give). Each rounding is scored on the same
positions of a text no calibration source sees (wiki:train by default):

- KL out: mean KL(dense || rounded) of the next-token distribution with the rounded matrix as
  the output layer only (hidden states of the dense model), in nats per position;
- KL both / Δnll both: the rounded matrix in both roles (tied), the model run again.

Writes metric_gap.json and metric_gap.md in --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def hidden_states(model, ids, window: int):
    """Final hidden states (positions x d) and the next tokens of `ids` cut into windows."""
    import torch

    hs, ys = [], []
    with torch.no_grad():
        for s in range(0, len(ids) - window + 1, window):
            chunk = ids[s: s + window]
            hs.append(model.model(input_ids=chunk[None]).last_hidden_state[0, :-1])
            ys.append(chunk[1:])
    return hs, ys


def score(model, emb, hs, ys, windows, rounded) -> dict[str, float]:
    """KL out, KL both and Δnll both of the `rounded` matrix (module doc)."""
    import torch
    import torch.nn.functional as F

    q = torch.from_numpy(rounded)
    sums = {"kl_out": 0.0, "kl_both": 0.0, "dnll_both": 0.0}
    n = 0
    with torch.no_grad():
        for h, y, chunk in zip(hs, ys, windows, strict=True):
            lp = F.log_softmax(h @ emb.t(), -1)
            sums["kl_out"] += float((lp.exp() * (lp - F.log_softmax(h @ q.t(), -1))).sum())
            model.get_input_embeddings().weight.copy_(q)
            hq = model.model(input_ids=chunk[None]).last_hidden_state[0, :-1]
            model.get_input_embeddings().weight.copy_(emb)
            lb = F.log_softmax(hq @ q.t(), -1)
            sums["kl_both"] += float((lp.exp() * (lp - lb)).sum())
            sums["dnll_both"] += float((lp - lb).gather(1, y[:, None]).sum())
            n += len(y)
    return {k: v / n for k, v in sums.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/metric_gap")
    ap.add_argument("--type", default="Q4_0", help="llama.cpp block type")
    ap.add_argument("--text", default="wiki:train", help="scored text (a bundled corpus split)")
    ap.add_argument("--windows", type=int, default=12, help="windows of 512 tokens scored")
    ap.add_argument("--sources", default="model,mix,oracle", help="calibration sources; oracle: the scored text's H")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import numpy as np
    import torch

    from lmembed.common.report import markdown_table, write_text
    from lmembed.compression.calibration.calibrate import calibrate
    from lmembed.compression.calibration.sensitivity import INPUT_WEIGHT, sensitivity
    from lmembed.data.texts import load_text
    from lmembed.errors import LmembedError
    from lmembed.export.blocks import decode_matrix
    from lmembed.export.calibrated_blocks import calibrated_rows, damped
    from lmembed.models.pretrained import load_pretrained

    if args.windows <= 0:
        ap.error(f"--windows: expected a positive number of windows, not {args.windows}")
    try:
        scored_text = load_text(args.text, max_chars=60 * 512 * args.windows)
    except LmembedError as e:
        ap.error(str(e))
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tok = load_pretrained("smollm2", task="causal-lm")
    emb = model.get_input_embeddings().weight.detach().clone()
    x = emb.numpy()
    ids = torch.tensor(tok(scored_text)["input_ids"])[: 512 * args.windows]
    if len(ids) < 512 * args.windows:
        ap.error(f"--text {args.text}: {len(ids)} tokens, fewer than --windows {args.windows} x 512")
    windows = list(ids.view(-1, 512))
    hs, ys = hidden_states(model, ids, 512)
    scored = torch.cat(hs).double()
    default = calibrate(model, "model", tokenizer=tok, seed=args.seed)
    rows = []
    for source in [s for s in args.sources.split(",") if s]:
        t0 = time.perf_counter()
        stats = default if source in ("model", "oracle") else calibrate(model, source, tokenizer=tok, seed=args.seed)
        m = sensitivity(stats, "tied", INPUT_WEIGHT)
        if source == "oracle":
            m = scored.t() @ scored / len(scored) + INPUT_WEIGHT * stats.input_fisher.double()
        data, _ = calibrated_rows(x, args.type, damped(m))
        rounded = decode_matrix(data, args.type, x.shape[1])
        row = {"source": source, "tokens": len(scored) if source == "oracle" else stats.tokens,
               **score(model, emb, hs, ys, windows, rounded), "fit_s": time.perf_counter() - t0}
        row.update({f"{k}_mnats": 1000 * row[k] for k in ("kl_out", "kl_both")})
        row["ppl_both_pct"] = 100 * float(np.expm1(row["dnll_both"]))
        print(f"{source}: KL out {row['kl_out']:.5f}, KL both {row['kl_both']:.5f}, "
              f"ppl both {row['ppl_both_pct']:+.2f} %", flush=True)
        rows.append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metric_gap.json").write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "out"},
                                                     "positions": len(scored), "rows": rows}, indent=1) + "\n")
    cols = [("source", "metric from"), ("tokens", "tokens it saw"), ("kl_out_mnats", "KL out (millinats)"),
            ("kl_both_mnats", "KL both (millinats)"), ("ppl_both_pct", "ppl both %"), ("fit_s", "seconds")]
    write_text(out / "metric_gap.md", f"# {args.type}: calibration metric against the scored text's own\n\n"
               f"{len(scored)} positions of {args.text}, seed {args.seed}.\n\n" + markdown_table(rows, cols))
    print((out / "metric_gap.md").read_text())


if __name__ == "__main__":
    main()
