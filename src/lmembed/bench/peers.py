"""`lmembed bench peers`: lmembed's quantisers against other libraries' at equal bits per value.

One model, one matrix, one evaluation: every row (lmembed's methods and the peers' configurations)
is scored with the metric that suits the model (see evaluation.subject), on the same text, in one
run. A tied model's one matrix serves the input lookup and the head in every row.

- lmembed rows compress with ``lmembed.compress`` (the modules evaluate from their packed codes);
- peer rows replace the matrix by the peer's *dequantised reconstruction* (its own kernels are
  not run), so they measure the peer's rounding, at the bits its format stores.

Bits per value are honest: every stored byte of the V x d matrix (codes, scales, zeros, block
headers, index maps) over V * d. A peer's codes count at B bits each, packed densely (the most
favourable packing for every peer: hqq's own 3-bit layout holds 10 codes per 32-bit word, and
torchao's unpacked tensor one code per int8); its scales and zeros count at the dtype the peer
stores them in (gguf: its exact block bytes). For each budget B the best row of each side with
bits per value <= B is named, and which one wins.

Peers (optional; a missing one gives "not installed" rows): gguf (gguf-py's reference
quantisers), hqq (half-quadratic optimised zeros and scales), optimum-quanto, torchao.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._version import __version__
from ..common.faults import fault_point
from ..common.files import bench_dir, read_json, write_json
from ..common.locks import holds_lock
from ..common.report import markdown_table, pyplot, write_text
from ..common.runtime import seed_everything
from ..compression import compress
from ..compression.api import check_method
from ..compression.calibration.calibrate import CalibStats
from ..compression.integration.sites import find_sites
from ..compression.methods.fit_quality import matrix_stats
from ..compression.registry import as_pipeline
from ..errors import LmembedError
from ..evaluation.pretrained import EVAL_TOKENS
from ..evaluation.subject import Subject, load_subject
from .compress import bench_settings

DEFAULT_METHODS = "kq2:g16,kq3:g32,kq3:g16,kq4:g32,int4:g32,kq4:g16,kq5:g16,kq6:g32,int8"
# calibrated rows: with the default calibration (text sampled from the model) unless --calib says otherwise;
# tc:3.047 is the 10.5x budget (32 / 10.5 bits per value) of the frontier targets
CALIBRATED_METHODS = ("tc:3,tc:3.047,tc:3.5,tc:4,tc:4.5,tc:5,tc:6,"
                      "kmixed:3,kmixed:3.5,kmixed:4,kmixed:4.5,kmixed:5,gptq-int4:g32,mixed:4.5:g32")
DEFAULT_PEERS = "gguf,hqq,quanto,torchao"
DEFAULT_BITS = "3,3.047,3.5,4,4.5,5,6,8"  # 3.047: the 10.5x of the frontier targets
BENCH_FILES = ("settings.json", "rows", "peers.json", "peers.md", "peers.png")
ROW_KEYS = ("source", "method", "library", "settings", "status", "stored_bytes", "values", "bits_per_value",
            "parts", "metric", "delta_pct", "rel_fro_error", "mean_row_cosine", "knn10_overlap", "simlex999",
            "fit_seconds", "eval_seconds", "identical_to_dense")


# --- peer configurations and their exact bytes ----------------------------------------------------
GGUF_BLOCKS = {  # type -> (values per block, bytes per block), as gguf-py's GGML_QUANT_SIZES says
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34), "MXFP4": (32, 17),
}
FAMILIES = {  # family -> (module to import, distribution, default configurations, name pattern, what it means)
    "gguf": ("gguf", "gguf", ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"), r"(" + "|".join(GGUF_BLOCKS) + r")",
             "a gguf-py type (" + ", ".join(GGUF_BLOCKS) + ")"),
    "hqq": ("hqq.core.quantize", "hqq", ("2b-g32", "3b-g64", "3b-g32", "4b-g64", "4b-g32"), r"([234568])b-g(\d+)",
            "Bb-gG with B in 2,3,4,5,6,8 (e.g. 4b-g64)"),
    "quanto": ("optimum.quanto", "optimum-quanto", ("qint4-g64", "qint4-g32"), r"qint(?:([24])-g(\d+)|(8))",
               "qint2-gG, qint4-gG or qint8 (per row)"),
    "torchao": ("torchao.quantization", "torchao", ("int4-g32-sym", "int4-g32-asym"),
                r"int([1-8])(?:-g(\d+))?-(sym|asym)", "intB[-gG]-sym|asym with B in 1..8 (no G: per row)"),
}
# bytes of one stored scale and one stored zero per family (gguf's live inside its blocks)
PARAM_BYTES = {"hqq": (2, 2), "quanto": (2, 2), "torchao": (2, 1)}


@dataclass(frozen=True)
class PeerConfig:
    """One peer quantiser setting: B-bit codes, one scale (and zero when asymmetric) per group."""

    family: str
    name: str
    bits: int
    group: int | None  # values sharing a scale, contiguous within a row; None: one per row
    asym: bool

    @property
    def label(self) -> str:
        return f"{self.family}:{self.name}"


def parse_peer(item: str) -> list[PeerConfig]:
    """`family` (its default configurations) or `family:NAME` (one), e.g. hqq or hqq:4b-g64."""
    family, _, name = item.strip().partition(":")
    if family not in FAMILIES:
        raise LmembedError(f"--peers: {family!r} is not a peer; expected one of {', '.join(FAMILIES)}")
    _, _, defaults, pattern, meaning = FAMILIES[family]
    if not name:
        return [c for n in defaults for c in parse_peer(f"{family}:{n}")]
    m = re.fullmatch(pattern, name)
    if m is None:
        raise LmembedError(f"--peers: {item!r}: expected {family}:NAME with NAME {meaning}")
    if family == "gguf":
        return [PeerConfig(family, name, int(re.search(r"\d", name)[0]), GGUF_BLOCKS[name][0], False)]
    if family == "hqq":
        return [PeerConfig(family, name, int(m[1]), int(m[2]), True)]
    if family == "quanto":
        return [PeerConfig(family, name, 8, None, False) if m[3] else PeerConfig(family, name, int(m[1]), int(m[2]),
                                                                                   True)]
    return [PeerConfig(family, name, int(m[1]), int(m[2]) if m[2] else None, m[3] == "asym")]


def parse_peers(spec: str) -> list[PeerConfig]:
    """Every configuration a --peers list names, once each, in order."""
    out: dict[str, PeerConfig] = {}
    for item in (s for s in str(spec).split(",") if s.strip()):
        for c in parse_peer(item):
            if c.group is not None and c.group < 1:
                raise LmembedError(f"--peers: {item!r}: the group must be at least 1")
            out.setdefault(c.label, c)
    return list(out.values())


def peer_parts(cfg: PeerConfig, v: int, d: int) -> dict[str, int]:
    """Exact stored bytes of a V x d matrix in this configuration, by part."""
    n = v * d
    if cfg.family == "gguf":
        block, size = GGUF_BLOCKS[cfg.name]
        return {"blocks": n // block * size}
    groups = v if cfg.group is None else n // cfg.group
    scale, zero = PARAM_BYTES[cfg.family]
    return {"codes": math.ceil(n * cfg.bits / 8), "scales": groups * scale, "zeros": groups * zero if cfg.asym else 0}


def peer_misfit(cfg: PeerConfig, d: int) -> str | None:
    """Why this configuration cannot store rows of d values (its groups would straddle rows), or None."""
    if cfg.group is not None and d % cfg.group:
        return f"not applicable: rows of {d} values do not split into groups of {cfg.group}"
    return None


# --- the peers' quantise + dequantise round trips -------------------------------------------------
def installed(family: str) -> str | None:
    """The installed version of a peer library, or None when it cannot be imported."""
    module, dist = FAMILIES[family][0], FAMILIES[family][1]
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - a broken install is as good as none
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown version"


def _codes_bytes(n: int, bits: int) -> int:
    return math.ceil(n * bits / 8)


def _gguf(E: torch.Tensor, cfg: PeerConfig) -> tuple[torch.Tensor, dict[str, int]]:
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    qt = GGMLQuantizationType[cfg.name]
    raw = quantize(E.detach().float().numpy(), qt)
    back = dequantize(raw, qt).astype(np.float32).reshape(E.shape)
    return torch.from_numpy(back), {"blocks": int(raw.nbytes)}


def _hqq(E: torch.Tensor, cfg: PeerConfig) -> tuple[torch.Tensor, dict[str, int]]:
    from hqq.core.quantize import Quantizer

    codes, meta = Quantizer.quantize(E.detach().float(), nbits=cfg.bits, group_size=cfg.group, optimize=True,
                                     axis=1, bitpack=False, device="cpu")
    meta["scale"], meta["zero"] = meta["scale"].half(), meta["zero"].half()  # stored as fp16, as HQQLinear does
    meta["compute_dtype"] = torch.float32
    back = Quantizer.dequantize(codes, meta).float().reshape(E.shape)
    return back, {"codes": _codes_bytes(E.numel(), cfg.bits), "scales": meta["scale"].numel() * 2,
                  "zeros": meta["zero"].numel() * 2}


def _quanto(E: torch.Tensor, cfg: PeerConfig) -> tuple[torch.Tensor, dict[str, int]]:
    from optimum.quanto import qint2, qint4, qint8
    from optimum.quanto.tensor.optimizers import AbsmaxOptimizer, MaxOptimizer
    from optimum.quanto.tensor.weights import quantize_weight

    qtype = {2: qint2, 4: qint4, 8: qint8}[cfg.bits]
    w = E.detach().half()
    if cfg.group is None:
        scale, shift = AbsmaxOptimizer()(w, qtype=qtype, axis=0), None
    else:
        scale, shift = MaxOptimizer()(w, qtype=qtype, axis=0, group_size=cfg.group)
    q = quantize_weight(w, qtype=qtype, axis=0, scale=scale, shift=shift, group_size=cfg.group, optimized=False)
    stored_shift = getattr(q, "_shift", None)
    zeros = stored_shift.numel() * stored_shift.element_size() if stored_shift is not None else 0
    return q.dequantize().float().reshape(E.shape), {
        "codes": _codes_bytes(E.numel(), cfg.bits), "scales": q._scale.numel() * q._scale.element_size(),
        "zeros": zeros}


def _torchao(E: torch.Tensor, cfg: PeerConfig) -> tuple[torch.Tensor, dict[str, int]]:
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_primitives import MappingType

    v, d = E.shape
    lin = nn.Linear(d, v, bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(E.detach().to(torch.bfloat16))
    quantize_(lin, IntxWeightOnlyConfig(
        weight_dtype=getattr(torch, f"int{cfg.bits}"), granularity=PerGroup(cfg.group) if cfg.group else PerAxis(0),
        mapping_type=MappingType.ASYMMETRIC if cfg.asym else MappingType.SYMMETRIC))
    w = lin.weight
    zeros = w.zero_point.numel() * w.zero_point.element_size() if cfg.asym else 0  # symmetric: all zero, unstored
    return w.dequantize().float().reshape(E.shape), {
        "codes": _codes_bytes(E.numel(), cfg.bits), "scales": w.scale.numel() * w.scale.element_size(), "zeros": zeros}


QUANTISERS: dict[str, Callable[[torch.Tensor, PeerConfig], tuple[torch.Tensor, dict[str, int]]]] = {
    "gguf": _gguf, "hqq": _hqq, "quanto": _quanto, "torchao": _torchao}


def peer_settings(cfg: PeerConfig) -> str:
    """What the configuration stores, in words (for the report)."""
    if cfg.family == "gguf":
        block, size = GGUF_BLOCKS[cfg.name]
        return f"GGUF {cfg.name}: {size}-byte blocks of {block} values"
    per = f"per group of {cfg.group}" if cfg.group else "per row"
    if cfg.family == "hqq":
        return f"{cfg.bits}-bit codes, fp16 scale + fp16 zero {per}, half-quadratic optimised (axis 1)"
    if cfg.family == "quanto":
        kind = "fp16 scale + fp16 shift (max optimiser)" if cfg.asym else "fp16 scale (absmax)"
        return f"{cfg.bits}-bit codes, {kind} {per}"
    zero = " + int8 zero point" if cfg.asym else ""
    return f"IntxWeightOnlyConfig int{cfg.bits} {'asym' if cfg.asym else 'sym'}, bf16 scale{zero} {per} (bf16 input)"


def quantise(E: torch.Tensor, cfg: PeerConfig) -> tuple[torch.Tensor, dict[str, int]]:
    """The peer's dequantised reconstruction of E (float32, E's shape) and its stored bytes by part."""
    return QUANTISERS[cfg.family](E, cfg)


# --- bits, budgets and winners -------------------------------------------------------------------
def parse_bits(spec: str) -> list[float]:
    """--bits: comma-separated budgets in bits per value, each in (0, 32]."""
    out = []
    for item in (s.strip() for s in str(spec).split(",")):
        try:
            b = float(item)
        except ValueError:
            raise LmembedError(f"--bits: {item!r} is not a number; expected budgets in bits per value such as "
                               f"{DEFAULT_BITS}") from None
        if not 0 < b <= 32 or not math.isfinite(b):
            raise LmembedError(f"--bits: {item} is out of range; expected bits per value in (0, 32]")
        out.append(b)
    return sorted(set(out))


def _brief(row: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if row is None else {k: row[k] for k in ("method", "bits_per_value", "metric", "delta_pct")}


def best_within(rows: list[dict[str, Any]], source: str, budget: float, lower_is_better: bool) -> dict | None:
    """The best scored row of one side whose bits per value fit the budget (fewer bits break ties)."""
    fits = [r for r in rows if r["source"] == source and r["metric"] is not None
            and r["bits_per_value"] is not None and r["bits_per_value"] <= budget + 1e-9]
    if not fits:
        return None
    sign = 1 if lower_is_better else -1
    return min(fits, key=lambda r: (sign * r["metric"], r["bits_per_value"], r["method"]))


def budget_table(rows: list[dict[str, Any]], budgets: list[float], lower_is_better: bool) -> list[dict[str, Any]]:
    """Per budget: the best lmembed row, the best peer row, and the winner (lmembed, peer, tie, or None)."""
    out = []
    for b in budgets:
        mine = best_within(rows, "lmembed", b, lower_is_better)
        peer = best_within(rows, "peer", b, lower_is_better)
        winner = None
        if mine is not None and peer is not None:
            a, p = mine["metric"], peer["metric"]
            winner = "tie" if a == p else ("lmembed" if (a < p) == lower_is_better else "peer")
        out.append({"bits": b, "lmembed": _brief(mine), "peer": _brief(peer), "winner": winner})
    return out


# --- rows ----------------------------------------------------------------------------------------
def make_row(**fields: Any) -> dict[str, Any]:
    """A row with every key of ROW_KEYS (unset ones None), so the JSON's keys never move."""
    unknown = set(fields) - set(ROW_KEYS)
    if unknown:
        raise ValueError(f"unknown row keys {sorted(unknown)}")
    return {k: fields.get(k) for k in ROW_KEYS}


def _roles(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The matrices a row replaces: a tied one once; an untied head's own matrix too."""
    sites = find_sites(model)
    if sites.tied:
        return [("tied", sites.input_weight)]
    out = [("input", sites.input_weight)]
    return out + [("output", sites.output_weight)] if sites.output_weight is not None else out


@contextlib.contextmanager
def swapped(params: list[nn.Parameter], new: list[torch.Tensor]) -> Iterator[None]:
    """The parameters hold `new` inside the block and their own values again after it."""
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, t in zip(params, new, strict=True):
                p.copy_(t.to(p.dtype))
        yield
    finally:
        with torch.no_grad():
            for p, t in zip(params, saved, strict=True):
                p.copy_(t)


def _scored(subject: Subject, dense: dict[str, Any] | None, evaluate: Callable[[], dict[str, float]]) -> dict:
    t0 = time.perf_counter()
    value = evaluate()[subject.metric]
    delta = 0.0 if dense is None else 100 * (value / dense["metric"] - 1)
    return {"metric": value, "delta_pct": delta, "eval_seconds": round(time.perf_counter() - t0, 1)}


def _fidelity(weights: list[torch.Tensor], recons: list[torch.Tensor], seed: int) -> dict[str, float]:
    """Matrix fidelity of the first (input) matrix, as `lmembed compress` reports it."""
    stats = matrix_stats(weights[0], recons[0].to(weights[0].dtype), seed=seed)
    return {k: stats[k] for k in ("rel_fro_error", "mean_row_cosine", "knn10_overlap")}


Scorer = Callable[[torch.Tensor], "float | None"] | None  # SimLex-999 of a matrix; None: not measured


def simlex_scorer(subject: Subject) -> Scorer:
    """SimLex-999 Spearman of a matrix over the subject's vocabulary: encoders only (their rows are
    words), and only where gensim ships the benchmark."""
    if subject.kind != "encoder":
        return None
    from ..evaluation.similarity import WordIndex, load_benchmark, word_similarity

    try:
        bench = load_benchmark("simlex999")
    except LmembedError:
        return None
    index = WordIndex.from_vocab(subject.tokenizer)
    return lambda E: word_similarity(E, index, bench)["spearman"]


def dense_row(subject: Subject, simlex: Scorer) -> dict[str, Any]:
    roles = _roles(subject.model)
    n = sum(w.numel() for _, w in roles)
    return make_row(source="dense", method="dense", library="-", settings="fp32", status="ok", stored_bytes=n * 4,
                    values=n, bits_per_value=32.0, rel_fro_error=0.0, mean_row_cosine=1.0, knn10_overlap=1.0,
                    simlex999=simlex(roles[0][1]) if simlex else None, fit_seconds=0.0, identical_to_dense=True,
                    **_scored(subject, None, lambda: subject.evaluate(subject.model)))


def peer_row(subject: Subject, cfg: PeerConfig, version: str | None, dense: dict[str, Any], seed: int,
             simlex: Scorer = None) -> dict[str, Any]:
    """One peer configuration: quantise each matrix, swap the reconstructions in, evaluate."""
    roles = _roles(subject.model)
    weights = [w for _, w in roles]
    n = sum(w.numel() for w in weights)
    base = {"source": "peer", "method": cfg.label, "settings": peer_settings(cfg), "values": n,
            "library": f"{FAMILIES[cfg.family][1]} {version}" if version else FAMILIES[cfg.family][1]}
    nominal = [peer_parts(cfg, *w.shape) for w in weights]
    base["parts"] = {k: sum(p[k] for p in nominal) for k in nominal[0]}
    base["stored_bytes"] = sum(base["parts"].values())
    base["bits_per_value"] = base["stored_bytes"] * 8 / n
    misfit = peer_misfit(cfg, weights[0].shape[1])
    if version is None or misfit:
        return make_row(**base, status=misfit or "not installed")
    t0 = time.perf_counter()
    recons, parts = zip(*(quantise(w.detach().float(), cfg) for w in weights), strict=True)
    fit = round(time.perf_counter() - t0, 1)
    measured = {k: sum(p[k] for p in parts) for k in parts[0]}
    if measured != base["parts"]:  # the library stored more (or less) than its format says: count what it stored
        total = sum(measured.values())
        base.update(parts=measured, stored_bytes=total, bits_per_value=total * 8 / n)
    same = all(torch.equal(r.to(w.dtype), w.detach()) for r, w in zip(recons, weights, strict=True))
    with swapped(weights, list(recons)):
        score = ({k: dense[k] for k in ("metric", "delta_pct")} | {"eval_seconds": 0.0} if same
                 else _scored(subject, dense, lambda: subject.evaluate(subject.model)))
    return make_row(**base, status="ok", fit_seconds=fit, identical_to_dense=same,
                    simlex999=simlex(recons[0]) if simlex else None,
                    **_fidelity(weights, list(recons), seed), **score)


def lmembed_row(subject: Subject, method: str, dense: dict[str, Any], seed: int, stats: CalibStats | None,
                simlex: Scorer = None, progress: bool | None = None) -> dict[str, Any]:
    """One lmembed method on a copy of the model (side auto: a tied matrix compressed once for both roles)."""
    model = copy.deepcopy(subject.model)
    needs = any(m.needs_calib for m in check_method(method, *find_sites(model).input_weight.shape))
    rep = compress(model, method, side="auto", seed=seed, progress=progress, calib=stats if needs else None,
                   tokenizer=subject.tokenizer)
    n = sum(m["shape"][0] * m["shape"][1] for m in rep["matrices"])
    first = rep["matrices"][0]
    similarity = None
    if simlex is not None:  # an encoder: SimLex-999 of the decoded matrix
        with torch.no_grad():
            similarity = simlex(model.get_input_embeddings().lookup(torch.arange(first["shape"][0])).float())
    row = make_row(source="lmembed", method=rep["method"], library=f"lmembed {__version__}", status="ok",
                   settings=", ".join(sorted({m["kind"] for m in rep["matrices"]})), stored_bytes=rep["stored_bytes"],
                   values=n, bits_per_value=rep["stored_bytes"] * 8 / n, parts={"module": rep["stored_bytes"]},
                   rel_fro_error=first["rel_fro_error"], mean_row_cosine=first["mean_row_cosine"],
                   knn10_overlap=first["knn10_overlap"], fit_seconds=round(rep["seconds"], 1),
                   simlex999=similarity,
                   **_scored(subject, dense, lambda: subject.evaluate(model)))
    return row


# --- the bench -----------------------------------------------------------------------------------
def _slug(source: str, method: str) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", method).strip("-")
    return f"{source}--{s}-{hashlib.sha1(f'{source}|{method}'.encode()).hexdigest()[:6]}"


def _cached(path: Path, resume: bool, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A finished row read back, or made and saved (rows saying "not installed" are not saved)."""
    if resume and path.exists():
        return read_json(path, "bench row")
    row = make()
    if row["status"] != "not installed":
        write_json(path, row)
        fault_point("bench:row")
    return row


def _method_list(methods: str | None) -> list[str]:
    spec = methods if methods is not None else DEFAULT_METHODS + "," + CALIBRATED_METHODS
    out = list(dict.fromkeys(m.strip() for m in spec.split(",") if m.strip()))
    if not out and methods is not None and methods.strip():
        raise LmembedError("--methods: give at least one method, e.g. kq4:g32,int8")
    return out


def _check_method_text(method: str) -> None:
    """Refuse what this bench cannot compare: a new vocabulary."""
    if as_pipeline(method)[0].vocabulary:
        raise LmembedError(f"--methods {method}: trimming changes the vocabulary; this bench compares one matrix "
                           "(give quantisers only)")


def _log_row(log, row: dict[str, Any], metric: str) -> None:
    if row["metric"] is None:
        log(f"{row['method']:>24s} {row['bits_per_value']:6.3f} bits  {row['status']}")
    else:
        log(f"{row['method']:>24s} {row['bits_per_value']:6.3f} bits  {metric} {row['metric']:.4g} "
            f"({row['delta_pct']:+.2f} %)")


@holds_lock("bench folder")
def bench_peers(model_spec: str, out: str | Path, *, text: str, bits: str = DEFAULT_BITS, methods: str | None = None,
                peers: str = DEFAULT_PEERS, calib: Any = None, calib_tokens: int | None = None,
                max_tokens: int = EVAL_TOKENS, seed: int = 0, force: bool = False, resume: bool = True,
                progress: bool | None = None, log=print, subject: Subject | None = None) -> dict[str, Any]:
    """lmembed's methods (default: calibration-free ones spanning 3-8 bits and calibrated ones, which
    get `calib` or the default calibration: text sampled from the model) and the peers'
    configurations on one model, with the best of each per budget.
    Every input is checked before the model loads or the folder changes."""
    budgets = parse_bits(bits)
    method_list = _method_list(methods)
    configs = parse_peers(peers)
    if not method_list and not configs:
        raise LmembedError("--methods/--peers: nothing to compare; give at least one method or peer")
    for m in method_list:
        _check_method_text(m)  # every bad string is reported before the model loads
    seed_everything(seed)
    subject = subject or load_subject(model_spec, text=text, max_tokens=max_tokens, progress=progress)
    v, d = find_sites(subject.model).input_weight.shape
    for m in method_list:
        check_method(m, v, d)
    out = bench_dir(out, force=force, owned=BENCH_FILES)
    (out / "rows").mkdir(exist_ok=True)
    settings, stats = bench_settings(out, subject, method_list, calib, calib_tokens, force, log, model=model_spec,
                                     text=text, max_tokens=max_tokens, seed=seed, progress=progress)
    versions = {f: installed(f) for f in dict.fromkeys(c.family for c in configs)}
    rows = _all_rows(subject, out, method_list, configs, versions, stats, seed, resume, progress, log)
    result = {"bench": "peers", **settings, "lower_is_better": subject.lower_is_better, "shape": [v, d],
              "tied": find_sites(subject.model).tied, "peers": versions,
              "reconstruction": "peer rows evaluate the peer's dequantised matrix; lmembed rows its packed modules",
              "rows": rows, "budgets": budget_table(rows, budgets, subject.lower_is_better)}
    write_json(out / "peers.json", result)
    log(write_report(out, result))
    return result


def _all_rows(subject: Subject, out: Path, methods: list[str], configs: list[PeerConfig], versions: dict[str, Any],
              stats: CalibStats | None, seed: int, resume: bool, progress, log) -> list[dict[str, Any]]:
    """dense, then lmembed's rows, then the peers' (each saved as soon as it is done)."""
    simlex = simlex_scorer(subject)
    dense = _cached(out / "rows" / "dense.json", resume, lambda: dense_row(subject, simlex))
    _log_row(log, dense, subject.metric)
    rows = [dense]
    for m in methods:
        row = _cached(out / "rows" / f"{_slug('lmembed', m)}.json", resume,
                      lambda m=m: lmembed_row(subject, m, dense, seed, stats, simlex, progress))
        rows.append(row)
        _log_row(log, row, subject.metric)
    for c in configs:
        row = _cached(out / "rows" / f"{_slug('peer', c.label)}.json", resume,
                      lambda c=c: peer_row(subject, c, versions[c.family], dense, seed, simlex))
        rows.append(row)
        _log_row(log, row, subject.metric)
    return rows


# --- report --------------------------------------------------------------------------------------
def _budget_lines(result: dict[str, Any]) -> list[dict[str, Any]]:
    def cell(entry: dict[str, Any] | None) -> str:
        if entry is None:
            return "-"
        e = entry
        return f"{e['method']} ({e['bits_per_value']:.3f} b): {e['metric']:.5g} ({e['delta_pct']:+.2f} %)"

    return [{"bits": b["bits"], "lmembed": cell(b["lmembed"]), "peer": cell(b["peer"]), "winner": b["winner"] or "-"}
            for b in result["budgets"]]


def _num(v: float | None, spec: str) -> str | None:
    return None if v is None else format(v, spec)


def _header(result: dict[str, Any]) -> str:
    shape, tied = result["shape"], result["tied"]
    peers = ", ".join(f"{f} {v or 'not installed'}" for f, v in result["peers"].items())
    return (f"# lmembed vs peer quantisers: {result['model']}\n\n"
            f"Matrix {shape[0]} x {shape[1]} ({'tied: one matrix serves lookup and head' if tied else 'untied'}); "
            f"{result['metric']} on `{result['text']}` ({result['eval']}); seed {result['seed']}. Peers: {peers}.\n\n"
            "Peer rows evaluate the peer's dequantised reconstruction of the matrix (its rounding, not its kernels); "
            "lmembed rows evaluate its packed modules. Bits per value count every stored byte (codes packed at B "
            "bits, scales and zeros at their stored dtype) over V x d.\n\n")


def plot_frontiers(path: Path, rows: list[dict[str, Any]], lower_is_better: bool, *, title: str, metric: str) -> None:
    """Loss against dense (%, log) vs bits per value: every row as a dot, and each side's best row
    within each bit budget as a step line (its frontier), labelled where it improves."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    floor = 0.01
    for side, colour in (("lmembed", "tab:blue"), ("peer", "tab:orange")):
        pts = sorted((r["bits_per_value"], max(floor, r["delta_pct"] if lower_is_better else -r["delta_pct"]),
                      r["method"]) for r in rows if r["source"] == side and r["metric"] is not None)
        if not pts:
            continue
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, color=colour, alpha=0.35)
        front, best = [], math.inf
        for b, loss, name in pts:
            if loss < best:
                best = loss
                front.append((b, loss, name))
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color=colour, marker="o",
                label=f"{side}: best within budget")
        last, below = -math.inf, False
        for b, loss, name in front:
            below = b - last < 0.2 and not below  # neighbours' labels alternate above and below their points
            ax.annotate(name, (b, loss), fontsize=7, xytext=(5, -11) if below else (3, 4), textcoords="offset points",
                        color=colour)
            last = b
    ax.set_yscale("log")
    ax.set_xlabel("stored bits per value (everything counted)")
    ax.set_ylabel(f"{metric} loss vs dense, % (log; {floor} = none)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(out: Path, result: dict[str, Any]) -> str:
    """peers.md and peers.png; returns the budget table."""
    metric, spec, text = result["metric"], result["model"], result["text"]
    rows = sorted(result["rows"], key=lambda r: (r["source"] != "dense", r["bits_per_value"] or 0, r["method"]))
    cols = [("source", "side"), ("method", "method"), ("bits", "bits/value"), ("stored_bytes", "bytes"),
            ("value", metric), ("delta", "delta %"), ("error", "rel. error"), ("status", "status"),
            ("library", "library"), ("settings", "stores"), ("fit_seconds", "fit s")]
    if any(r["simlex999"] is not None for r in rows):
        cols.insert(6, ("simlex", "SimLex-999"))
    shown = [dict(r, bits=_num(r["bits_per_value"], ".3f"), value=_num(r["metric"], ".5g"),
                  delta=_num(r["delta_pct"], "+.2f"), error=_num(r["rel_fro_error"], ".3g"),
                  simlex=_num(r["simlex999"], ".4f")) for r in rows]
    budgets = markdown_table(_budget_lines(result), [("bits", "budget (bits/value)"), ("lmembed", "best lmembed"),
                                                     ("peer", "best peer"), ("winner", "winner")])
    dense = next(r for r in rows if r["source"] == "dense")
    plot_frontiers(out / "peers.png", rows, result["lower_is_better"],
                   title=f"{spec}: {metric} on {text} (dense {dense['metric']:.4g})", metric=metric)
    write_text(out / "peers.md", _header(result) + "## Best per budget\n\n" + budgets + "\n## All rows\n\n"
               + markdown_table(shown, cols) + "\n![bits vs quality](peers.png)\n")
    return budgets
