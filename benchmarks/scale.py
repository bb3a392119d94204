"""Embedding compression at the vocabularies people deploy: 128k-262k rows, seconds and peak memory.

    python benchmarks/scale.py --out runs/scale                       # the three shapes + the V sweep
    python benchmarks/scale.py --shapes gemma3-270m --methods tc:4.5 --sweep "" --out runs/scale-g

Models with the shapes of Llama 3.2 1B (128,256 x 2,048), Qwen2.5 0.5B (151,936 x 896) and Gemma 3
270M (262,144 x 640) are built with random weights and one layer (the embedding is the subject; a
random model samples as fast as a trained one). Each shape runs in a fresh process, one step after
the other: the default calibration (4,096 tokens sampled from the model, its hidden-state moment
and input Fisher), then each method's fit on the tied matrix (`tc`, `kq`, `kmixed`), then the
calibrated GGUF block rounding llama.cpp users get (`--bits` with a .gguf output). For every step:
seconds, and the peak RSS it adds over what the process held before it, in copies of the fp32
matrix. A sweep over V at d = 640 (Gemma's width) fits seconds = a + b V per step and reports how
far the largest V lands from the line fitted on the others, so a super-linear step shows.

Targets (issue: frontier 2): peak RSS of a fit <= 2 copies of the fp32 matrix; calibrate +
compress of a 262,144 x 640 matrix under 5 minutes on a 2-core CPU; cost linear in V. Writes
scale.json and scale.md in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {  # name: (vocab, dim, transformers architecture)
    "llama3.2-1b": (128_256, 2048, "llama"),
    "qwen2.5-0.5b": (151_936, 896, "qwen2"),
    "gemma3-270m": (262_144, 640, "gemma3"),
}
DEFAULT_METHODS = "tc:4.5,kq4:g32,kmixed:4.5"
DEFAULT_SWEEP = "32768,65536,131072"  # V at d = 640, tc:4.5 and calibration; Gemma's 262,144 x 640 ends the line


def rss_mb() -> tuple[float, float]:
    """(current, peak) RSS of this process in MiB."""
    field = {ln.split(":")[0]: ln.split()[1] for ln in Path("/proc/self/status").read_text().splitlines()
             if ln.startswith("Vm")}
    return int(field["VmRSS"]) / 1024, int(field["VmHWM"]) / 1024


def build(vocab: int, dim: int, arch: str, seed: int):
    """A one-layer causal LM of the given shape with tied embeddings and random weights."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    heads = max(1, dim // 128)
    common = dict(vocab_size=vocab, hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=1,
                  num_attention_heads=heads, num_key_value_heads=1, max_position_embeddings=1024,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    elif arch == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    elif arch == "gemma3":
        model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**common, head_dim=dim // heads))
    else:
        raise ValueError(arch)
    return model.eval()


def measured(fn):
    """(result, seconds, peak RSS added in MiB) of fn(), with the peak reset first."""
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: this step's own peak is measured
    before, _ = rss_mb()
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, rss_mb()[1] - before


def worker(spec: dict) -> dict:
    """One shape: calibrate, then each fit, then the GGUF rounding (runs in its own process)."""
    import torch

    torch.set_num_threads(spec["threads"])
    import lmembed  # noqa: F401
    from lmembed.common.runtime import tune_allocator
    from lmembed.compression.api import run_pipeline
    from lmembed.compression.calibration.calibrate import calibrate
    from lmembed.compression.registry import FitContext, parse_pipeline

    tune_allocator(spec["mmap_mib"] << 20)  # as the CLI, unless --mmap-mib says otherwise
    model = build(spec["vocab"], spec["dim"], spec["arch"], spec["seed"])
    weight = model.get_input_embeddings().weight.detach()
    matrix_mb = weight.numel() * 4 / 2**20
    weight.sum()  # the matrix paged in: it is the model's, not a step's
    steps = {}
    stats, s, mb = measured(lambda: calibrate(model, "model", seed=spec["seed"], cache=False))
    steps["calibrate"] = {"seconds": s, "extra_mb": mb}
    for method in spec["methods"]:
        ctx = FitContext(seed=spec["seed"], calib=stats, side="tied")
        module, s, mb = measured(lambda m=method, c=ctx: run_pipeline(parse_pipeline(m), weight, c, m))
        steps[method] = {"seconds": s, "extra_mb": mb, "stored_bytes": module.stored_bytes(),
                         "bits_per_value": 8 * module.stored_bytes() / weight.numel()}
        del module
    if spec["gguf_bits"]:
        kind, s, mb = measured(lambda: gguf_rounding(weight, stats, spec["gguf_bits"], spec["seed"]))
        steps[f"gguf within {spec['gguf_bits']:g} bits ({kind} chosen)"] = {"seconds": s, "extra_mb": mb}
    return {"matrix_mb": matrix_mb, "steps": steps}


def gguf_rounding(weight, stats, bits: float, seed: int) -> str:
    """What `lmembed compress X.gguf --bits B --out Y.gguf` does to a tied token matrix: the block type
    of lowest calibrated cost within B bits, then every row rounded into it under the H + G metric."""
    from lmembed.compression.calibration.sensitivity import INPUT_WEIGHT, sensitivity
    from lmembed.compression.methods.calibrated import FLOOR
    from lmembed.export.calibrated_blocks import calibrated_rows, choose_type, damped

    x = weight.numpy()
    metric = damped(sensitivity(stats, "tied", INPUT_WEIGHT))
    weights = stats.row_weights("tied", mix=1.0, floor=FLOOR.default).numpy()
    kind, _ = choose_type(x, weights, metric, bits, seed=seed)
    calibrated_rows(x, kind, metric)
    return kind


def run_child(spec: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                         env=env)
    if out.returncode != 0:
        raise SystemExit(f"{spec['name']}: failed\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def rows_of(name: str, vocab: int, dim: int, res: dict) -> list[dict]:
    calib = res["steps"]["calibrate"]["seconds"]
    rows = []
    for step, r in res["steps"].items():
        row = {"shape": name, "V": vocab, "d": dim, "step": step, "seconds": r["seconds"],
               "extra_in_matrices": r["extra_mb"] / res["matrix_mb"], "matrix_mb": res["matrix_mb"]}
        if step != "calibrate":
            row["with_calibration_s"] = calib + r["seconds"]
            row["bits_per_value"] = r.get("bits_per_value")
        row["meets_memory"] = row["extra_in_matrices"] <= 2.0
        rows.append(row)
    return rows


def linearity(rows: list[dict]) -> list[dict]:
    """Per step: seconds = a + b V fitted on all but the largest V; how far the largest lands off it."""
    import numpy as np

    out = []
    for step in sorted({r["step"] for r in rows}):
        pts = sorted((r["V"], r["seconds"]) for r in rows if r["step"] == step)
        if len(pts) < 3:
            continue
        v, s = np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)
        b, a = np.polyfit(v[:-1], s[:-1], 1)
        slope = float(np.polyfit(np.log(v), np.log(np.maximum(s, 1e-9)), 1)[0])
        out.append({"step": step, "a_seconds": float(a), "b_seconds_per_row": float(b),
                    "predicted_largest_s": float(a + b * v[-1]), "measured_largest_s": float(s[-1]),
                    "largest_over_line": float(s[-1] / max(a + b * v[-1], 1e-9)), "log_log_slope": slope})
    return out


def write_report(rows: list[dict], lin: list[dict], out: Path) -> None:
    from lmembed.common.files import write_json
    from lmembed.common.report import markdown_table, write_text

    write_json(out / "scale.json", {"rows": rows, "linearity": lin})
    table = markdown_table(rows, [("shape", "shape"), ("V", "V"), ("d", "d"), ("step", "step"),
                                  ("seconds", "seconds"), ("with_calibration_s", "with calibration s"),
                                  ("extra_in_matrices", "peak extra (fp32 matrices)"),
                                  ("bits_per_value", "bits per value"), ("meets_memory", "<= 2 matrices")])
    text = "# Compression at large vocabularies\n\n" + __doc__.split("\n\n")[1] + "\n\n" + table
    if lin:
        text += "\n## Cost against V (d = 640)\n\n" + markdown_table(lin, [
            ("step", "step"), ("a_seconds", "a s"), ("b_seconds_per_row", "b s per row"),
            ("predicted_largest_s", "line at the largest V s"), ("measured_largest_s", "measured s"),
            ("largest_over_line", "measured / line"), ("log_log_slope", "log-log slope")])
    write_text(out / "scale.md", text)
    print(text)


def main() -> None:
    from lmembed.common.runtime import LARGE_ALLOCATION

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/scale")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--sweep", default=DEFAULT_SWEEP, help="vocabulary sizes at d = 640 ('' to skip)")
    ap.add_argument("--sweep-methods", default="tc:4.5")
    ap.add_argument("--gguf-bits", type=float, default=4.5, help="calibrated GGUF rounding within B bits (0: skip)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mmap-mib", type=int, default=LARGE_ALLOCATION >> 20,
                    help="glibc's fixed mmap threshold in the worker, MiB (default: the CLI's)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.mmap_mib <= 0:
        ap.error(f"--mmap-mib: expected a positive number of MiB, not {args.mmap_mib}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    rows: list[dict] = []
    for name in (s.strip() for s in args.shapes.split(",") if s.strip()):
        vocab, dim, arch = SHAPES[name]
        spec = {"name": name, "vocab": vocab, "dim": dim, "arch": arch, "methods": methods, "seed": args.seed,
                "threads": args.threads, "gguf_bits": args.gguf_bits, "mmap_mib": args.mmap_mib}
        rows += rows_of(name, vocab, dim, run_child(spec))
        print(f"{name}: done", file=sys.stderr)
    sweep_rows: list[dict] = []
    for vocab in (int(v) for v in args.sweep.split(",") if v.strip()):
        spec = {"name": f"sweep-{vocab}", "vocab": vocab, "dim": 640, "arch": "gemma3", "seed": args.seed,
                "methods": [m.strip() for m in args.sweep_methods.split(",") if m.strip()],
                "threads": args.threads, "gguf_bits": 0, "mmap_mib": args.mmap_mib}
        sweep_rows += rows_of(f"sweep V={vocab}", vocab, 640, run_child(spec))
        print(f"sweep {vocab}: done", file=sys.stderr)
    steps = {r["step"] for r in sweep_rows}
    swept = {x["V"] for x in sweep_rows}
    same_width = [r for r in rows if r["d"] == 640 and r["step"] in steps and r["V"] not in swept]
    write_report(rows + sweep_rows, linearity(sweep_rows + same_width), out)


if __name__ == "__main__":
    main()
