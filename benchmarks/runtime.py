"""Compressed models at run time: memory after and during load, forward and greedy-generate speed,
dense vs every compressed module kind, in one run (ratios against the dense model measured alongside).

    python benchmarks/runtime.py --out runs/runtime                    # SmolLM2 and MiniLM, every kind
    python benchmarks/runtime.py --models smollm2 --methods int4:g32 --out runs/rt --bf16 --compile

Every variant runs in a fresh process (one at a time, so they never compete for the cores):
RSS right after loading, the peak RSS of the process up to then (load included), RSS after a
1 x TOKENS forward and a greedy generate of GENERATE tokens, and RSS once every embedding row has
been looked up (weights are memory-mapped: an encoder's dense embedding costs memory only for
the rows it has met, so the comparison that counts is with every row touched, as a server's is). The dense
model is transformers' own from_pretrained of the fp32 folder; compressed ones are lmembed.load
of a save written first (calibrated methods calibrate from scratch, by lmembed's default).
`lmembed compress`'s own peak is measured the same way, in two steps: the RSS that calibration
adds over the loaded dense model (it runs the model: activations, key/value cache), then the RSS
the fit adds, against the bytes of one fp32 copy of the matrix. Each compressed row also names its
module kind and the bytes per row its derived index tables take (CompressedEmbedding.derived_bytes).
Writes runtime.json and runtime.md in --out.

Targets (issue: every compressed format fast where it runs), each a pass/fail column: greedy
generate >= 1.0 x dense tokens/s, a TOKENS-token forward >= 0.9 x dense, RSS with every row touched
<= dense - (dense embedding bytes - stored embedding bytes) + 5 % (and peak during load <= 1.15 x
final RSS, reported). Every timed process fixes glibc's mmap threshold at 1 MiB first
(lmembed.common.runtime.tune_allocator with EXACT_RSS; the CLI uses 4 MiB): with the default dynamic
threshold, freed temporaries of a few MB stay in the heap or not depending on what was allocated
before, and the same save's RSS with every row touched varied from 888 to 1,078 MiB over runs
(SmolLM2, mixed:4.5; --default-allocator measures that way). Speeds are the best of --repeats calls
in each of --rounds processes per variant (variants run in turn, round after round; memory is the
highest of the rounds), in wall time and in CPU time of the process; the speed targets are judged
on CPU time (one thread: the wall time of a quiet machine, while on a shared one the other
processes' turns do not count). A model without an output layer (MiniLM) has no generate column.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# one method per module kind (quantized, superblock, mixed, kmixed, tc, factorized, rowrank); wsvd
# keeps 3/4 of the rank: 432 of SmolLM2's 576, 288 of MiniLM's 384
KINDS = "int8,int4:g32,kq4:g32,mixed:4.5:g64:grid=half,kmixed:4.5,tc:4.5"
DEFAULT_METHODS = {"smollm2": f"{KINDS},wsvd:432,wsvd:432:alloc=rows",
                   "minilm": f"{KINDS},wsvd:288,wsvd:288:alloc=rows"}
GENERATE_TARGET, FORWARD_TARGET = 1.0, 0.9  # x dense tokens/s
PROMPT = ("The history of the city begins with a small settlement on the river, where traders from the north met "
          "farmers from the valley. Over the centuries it grew into a market town, then an industrial centre, and "
          "today it is known for its universities, its museums and its long tradition of music. ") * 8


def rss_mb() -> tuple[float, float]:
    """(current RSS, peak RSS so far) of this process in MiB."""
    status = Path("/proc/self/status").read_text()
    field = {line.split(":")[0]: line.split()[1] for line in status.splitlines() if line.startswith("Vm")}
    return int(field["VmRSS"]) / 1024, int(field["VmHWM"]) / 1024


def worker(spec: dict) -> dict:
    """Load one variant and time it (runs in its own process)."""
    import torch

    torch.set_num_threads(spec["threads"])
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    import lmembed  # noqa: F401 - registers the transformers quantizer, as users import it
    from lmembed.common.runtime import EXACT_RSS, tune_allocator

    if not spec.get("default_allocator"):
        tune_allocator(EXACT_RSS)  # dense and compressed alike: RSS is what is live, not what glibc kept

    base_rss, _ = rss_mb()
    t0 = time.perf_counter()
    if spec["folder_kind"] == "dense":
        cls = AutoModelForCausalLM if spec["causal"] else AutoModel
        model = cls.from_pretrained(spec["folder"], dtype=torch.float32).eval()
    else:
        model = lmembed.load(spec["folder"])
    if spec.get("bf16"):
        model = model.to(torch.bfloat16)
    load_s = time.perf_counter() - t0
    rss_load, peak_load = rss_mb()
    tok = AutoTokenizer.from_pretrained(spec["tokenizer"])
    ids = tok(PROMPT, return_tensors="pt")["input_ids"][:, : spec["tokens"]]
    step = torch.compile(model) if spec.get("compile") else model
    res = {"load_s": load_s, "rss_base": base_rss, "rss_load": rss_load, "peak_load": peak_load}
    with torch.no_grad():
        step(input_ids=ids)  # warm-up (and compilation)
        fwd = _best([_time(lambda: step(input_ids=ids)) for _ in range(spec["repeats"])])
        res["forward_tok_s"], res["forward_cpu_tok_s"] = ids.shape[1] / fwd[0], ids.shape[1] / fwd[1]
        if spec["causal"] and spec["generate"]:
            prompt = ids[:, :32]
            kw = {"max_new_tokens": spec["generate"], "min_new_tokens": spec["generate"], "do_sample": False,
                  "pad_token_id": tok.eos_token_id}
            model.generate(prompt, **kw)
            gen = _best([_time(lambda: model.generate(prompt, **kw)) for _ in range(spec["repeats"])])
            res["generate_tok_s"], res["generate_cpu_tok_s"] = spec["generate"] / gen[0], spec["generate"] / gen[1]
        res["rss_run"], res["peak_run"] = rss_mb()
        emb = model.get_input_embeddings()
        res["kind"] = getattr(emb, "kind", "dense")
        if hasattr(emb, "derived_bytes"):
            res["derived_bytes_per_row"] = emb.derived_bytes() / emb.num_embeddings
        for ids in torch.arange(emb.num_embeddings).split(4096):  # a server meets every token in time
            emb(ids[None])
    res["rss_warm"], res["peak_warm"] = rss_mb()
    return res


def _time(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def _best(times: list[tuple[float, float]]) -> tuple[float, float]:
    return min(w for w, _ in times), min(c for _, c in times)


def compress_worker(spec: dict) -> dict:
    """`lmembed compress` in a fresh process: the RSS that calibration (a forward pass / sampling of
    the model: its activations and key/value cache) and then the fit add over the loaded dense model."""
    import torch

    torch.set_num_threads(spec["threads"])
    import lmembed
    from lmembed.common.runtime import tune_allocator
    from lmembed.compression.calibration import calibrate
    from lmembed.models.pretrained import load_pretrained

    tune_allocator()
    calib_dir = Path(tempfile.mkdtemp(prefix="lmembed-runtime-"))  # calibration is part of compressing:
    calibrate._cache_dir = lambda: calib_dir  # never read back from an earlier run
    model, tok = load_pretrained(spec["model"])
    matrix = model.get_input_embeddings().weight
    matrix_mb = matrix.numel() * matrix.element_size() / 2**20
    matrix.sum()  # the model's own matrix paged in: it is not an extra copy

    def peak_of(fn):
        Path("/proc/self/clear_refs").write_text("5")  # the peak so far reset: this step's own is wanted
        before, _ = rss_mb()
        t0 = time.perf_counter()
        result = fn()
        return result, rss_mb()[1] - before, time.perf_counter() - t0

    stats, calib_mb, calib_s = peak_of(lambda: calibrate.resolve_calibration(
        model, [spec["method"]], spec.get("calib"), tokenizer=tok, tokens=spec.get("calib_tokens"), seed=spec["seed"]))
    rep, fit_mb, fit_s = peak_of(lambda: lmembed.compress(model, spec["method"], tokenizer=tok, calib=stats,
                                                          seed=spec["seed"]))
    rep.pop("tokenizer", None)
    lmembed.save(model, spec["out"], tokenizer=tok, force=True, report=rep)
    return {"matrix_mb": matrix_mb, "calib_extra_mb": calib_mb if stats is not None else None,
            "calib_seconds": calib_s if stats is not None else None, "extra_peak_mb": fit_mb,
            "extra_in_matrices": fit_mb / matrix_mb, "seconds": fit_s + calib_s, "stored_bytes": rep["stored_bytes"],
            "dense_embedding_bytes": rep["dense_fp32_bytes"]}


def run_child(kind: str, spec: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    out = subprocess.run([sys.executable, __file__, f"--{kind}", json.dumps(spec)], capture_output=True, text=True,
                         env=env)
    if out.returncode != 0:
        raise SystemExit(f"{kind} {spec.get('name')}: failed\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _compressed(save: Path, spec: dict, reuse: bool) -> dict:
    """Compress in a fresh process, its measurements kept beside the save; with `reuse`, a save made
    by an earlier run with the same settings is timed again instead (its compress columns repeat)."""
    record = save.with_name(save.name + ".compress.json")
    if reuse and record.is_file() and save.is_dir():
        kept = json.loads(record.read_text())
        if kept.get("spec") == spec:
            return kept["result"]
    comp = run_child("compress-worker", spec)
    record.write_text(json.dumps({"spec": spec, "result": comp}))
    return comp


def bench_model(name: str, methods: list[str], args: argparse.Namespace) -> list[dict]:
    from lmembed.evaluation.pretrained import model_kind
    from lmembed.models.pretrained import load_pretrained, resolve_model

    folder, _ = resolve_model(name)
    model, _ = load_pretrained(name)
    causal, d = model_kind(model) == "causal", model.get_input_embeddings().weight.shape[1]
    del model
    common = {"threads": args.threads, "tokens": args.tokens, "generate": args.generate, "repeats": args.repeats,
              "causal": causal, "tokenizer": folder, "default_allocator": args.default_allocator}
    variants = [{"name": "dense", "folder_kind": "dense", "folder": folder, **common}]
    if args.bf16:
        variants.append({**variants[0], "name": "dense bf16", "bf16": True})
    if args.compile:
        variants.append({**variants[0], "name": "dense compiled", "compile": True})
    rows = []
    for method in methods:
        save = Path(args.out) / "saves" / f"{name}-{method.replace(':', '_').replace('>', '_').replace(' ', '')}"
        comp = _compressed(save, {"model": name, "method": method, "out": str(save), "seed": args.seed,
                                  "threads": args.threads, "calib": args.calib, "calib_tokens": args.calib_tokens},
                           args.reuse_saves)
        rows.append({"model": name, "variant": method, "compress": comp})
        variants.append({"name": method, "folder_kind": "lmembed", "folder": str(save), **common})
        if args.bf16:
            variants.append({**variants[-1], "name": f"{method} bf16", "bf16": True})
        if args.compile and method in ("int8", "int4:g32"):
            variants.append({**variants[-1], "name": f"{method} compiled", "compile": True, "bf16": False})
    runs: dict[str, list[dict]] = {v["name"]: [] for v in variants}
    for _ in range(args.rounds):  # every variant once per round, in turn: slow spells of the machine spread out
        for v in variants:
            runs[v["name"]].append(run_child("worker", v))
    results = {name: _merge(r) for name, r in runs.items()}
    return [_row(name, v, results, rows, d) for v in results]


def _merge(runs: list[dict]) -> dict:
    """One variant over rounds: the fastest speeds, the highest memory (a process's speed varies by
    up to 10-20 % from one to the next on a shared machine; its memory should not, and if it does
    the worst case is the one to meet)."""
    out = dict(runs[0])
    for key in out:
        values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
        if values and key != "derived_bytes_per_row":
            out[key] = max(values) if key.endswith("tok_s") or key.startswith(("rss", "peak")) else min(values)
    out["rounds"] = len(runs)
    return out


def _row(model: str, variant: str, results: dict, comp_rows: list[dict], d: int) -> dict:
    r, dense = results[variant], results["dense"]
    comp = next((c["compress"] for c in comp_rows if c["variant"] == variant.split(" ")[0]), None)
    row = {"model": model, "variant": variant, **r,
           "rss_ratio": r["rss_warm"] / dense["rss_warm"], "peak_over_final": r["peak_load"] / r["rss_load"],
           "forward_ratio": r["forward_tok_s"] / dense["forward_tok_s"],
           "forward_cpu_ratio": r["forward_cpu_tok_s"] / dense["forward_cpu_tok_s"]}
    if "generate_tok_s" in r:
        row["generate_ratio"] = r["generate_tok_s"] / dense["generate_tok_s"]
        row["generate_cpu_ratio"] = r["generate_cpu_tok_s"] / dense["generate_cpu_tok_s"]
    if comp is not None:
        saved_mb = (comp["dense_embedding_bytes"] - comp["stored_bytes"]) / 2**20
        row["rss_target_mb"] = (dense["rss_warm"] - saved_mb) * 1.05
        row["rss_meets_target"] = r["rss_warm"] <= row["rss_target_mb"]
        row["rss_pass"] = _verdict(row["rss_meets_target"])
        row["forward_pass"] = _verdict(row["forward_cpu_ratio"] >= FORWARD_TARGET)
        if "generate_ratio" in row:
            row["generate_pass"] = _verdict(row["generate_cpu_ratio"] >= GENERATE_TARGET)
        row["compress_extra_in_matrices"] = comp["extra_in_matrices"]
        row["compress_seconds"] = comp["seconds"]
        row["calib_extra_mb"] = comp["calib_extra_mb"]
    return row


def _verdict(ok: bool) -> str:
    return "pass" if ok else "FAIL"


def write_report(rows: list[dict], out: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from lmembed.common.files import write_json
    from lmembed.common.report import markdown_table, write_text

    write_json(out / "runtime.json", {"rows": rows})
    cols = [("model", "model"), ("variant", "variant"), ("kind", "module kind"),
            ("derived_bytes_per_row", "index bytes / row"), ("rss_load", "RSS after load MiB"),
            ("peak_load", "peak during load MiB"), ("rss_run", "RSS running MiB"),
            ("rss_warm", "RSS, all rows touched MiB"), ("rss_target_mb", "target MiB"), ("rss_pass", "RSS target"),
            ("rss_ratio", "RSS vs dense"), ("peak_over_final", "peak / load RSS"),
            ("forward_tok_s", "forward tok/s"), ("forward_ratio", "forward vs dense"),
            ("forward_cpu_ratio", "forward vs dense, CPU s"), ("forward_pass", f"forward >= {FORWARD_TARGET}x"),
            ("generate_tok_s", "generate tok/s"), ("generate_ratio", "generate vs dense"),
            ("generate_cpu_ratio", "generate vs dense, CPU s"), ("generate_pass", f"generate >= {GENERATE_TARGET}x"),
            ("compress_extra_in_matrices", "fit peak extra (matrices)"), ("calib_extra_mb", "calibration extra MiB"),
            ("compress_seconds", "calibrate + compress s")]
    table = markdown_table(rows, cols)
    about = "\n\n".join(__doc__.split("\n\n")[2:4])
    write_text(out / "runtime.md", "# Compressed models at run time\n\n" + about + "\n\n" + table)
    print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/runtime")
    ap.add_argument("--models", default="smollm2,minilm")
    ap.add_argument("--methods", help="comma-separated methods for every model (default: " +
                    "; ".join(f"{k}: {v}" for k, v in DEFAULT_METHODS.items()) + ")")
    ap.add_argument("--calib", help="calibration of the calibrated methods (default: lmembed's, text sampled "
                                   "from the model, or the bundled mix for an encoder)")
    ap.add_argument("--calib-tokens", type=int)
    ap.add_argument("--tokens", type=int, default=512, help="forward pass length")
    ap.add_argument("--generate", type=int, default=64, help="greedy tokens generated")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per process (the best counts)")
    ap.add_argument("--rounds", type=int, default=2, help="processes per variant, run in turn (the best speed and "
                                                          "the highest memory count)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bf16", action="store_true", help="also run every variant in bfloat16")
    ap.add_argument("--compile", action="store_true", help="also run dense, int8 and int4:g32 under torch.compile")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--default-allocator", action="store_true",
                    help="leave glibc's dynamic mmap threshold on in the timed processes (RSS then varies by "
                         "100-200 MB from run to run for the same model)")
    ap.add_argument("--reuse-saves", action="store_true",
                    help="time the saves an earlier run left in --out/saves (same method, seed and calibration) "
                         "instead of compressing again")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--compress-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker or args.compress_worker:
        fn, spec = (worker, args.worker) if args.worker else (compress_worker, args.compress_worker)
        print(json.dumps(fn(json.loads(spec))))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in (n.strip() for n in args.models.split(",") if n.strip()):
        methods = args.methods or DEFAULT_METHODS.get(name, DEFAULT_METHODS["smollm2"])
        rows += bench_model(name, [m.strip() for m in methods.split(",") if m.strip()], args)
    write_report(rows, out)


if __name__ == "__main__":
    main()
