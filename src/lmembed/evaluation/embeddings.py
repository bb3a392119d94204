"""Embedding quality analysis: input (U) vs output (V) vs tied matrices (Press & Wolf 2017).

``analyze(model, vocab)`` measures every embedding matrix a model has: for an untied model both
U (input) and V (output), for a tied model the one shared matrix ("tied"), for an encoder without
an output head (MiniLM) just U. Per matrix: word-similarity Spearman (SimLex-999, WordSim-353 or
any ``word1 word2 score`` file), analogy accuracy, effective rank and spectrum, norm statistics,
anisotropy and nearest neighbours; across matrices: how alike they rank the similarities of the
same word pairs. ``analyze_targets`` does the same for several runs/models (and compares the
matrices of targets that share a vocabulary, e.g. an untied and a tied run), ``write_analysis``
writes JSON, Markdown and PNGs. The `lmembed analyze` command is a thin layer over these.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..compression import compress
from ..compression.integration.open import open_model
from ..errors import LmembedError
from .rank import mean_cosine, norm_stats, spectrum_stats
from .similarity import (
    DEFAULT_ANALOGIES,
    DEFAULT_BENCHMARKS,
    WordIndex,
    analogy_accuracy,
    load_analogies,
    load_benchmark,
    nearest_neighbours,
    sample_rows,
    similarity_agreement,
    word_similarity,
)

DEFAULT_WORDS = ("money", "president", "good", "three", "city", "war", "computer", "run")


# --- matrices ------------------------------------------------------------------------------------

def _core(module: nn.Module) -> nn.Module:
    """The module that holds the matrix: an output head wrapping an embedding module (lmembed's
    CompressedHead) stands for the module it wraps."""
    inner = getattr(module, "embedding", None)
    if not callable(getattr(module, "dense", None)) and not isinstance(getattr(module, "weight", None), torch.Tensor) \
            and isinstance(inner, nn.Module):
        return inner
    return module


def embedding_matrix(module: nn.Module) -> torch.Tensor:
    """The V x d matrix a (possibly compressed) embedding or output module stands for, as float32
    on the CPU: ``module.dense()`` when the module has one (compressed modules), else ``weight``."""
    module = _core(module)
    dense = getattr(module, "dense", None)
    if callable(dense):
        with torch.no_grad():
            E = dense()
    elif isinstance(getattr(module, "weight", None), torch.Tensor):
        E = module.weight
    else:
        raise LmembedError(f"{type(module).__name__}: neither dense() nor a weight matrix to analyse")
    if E.dim() != 2:
        raise LmembedError(f"{type(module).__name__}: expected a 2-d embedding matrix, got shape {tuple(E.shape)}")
    return E.detach().float().cpu()


def _same_tensor(a: nn.Module, b: nn.Module) -> bool:
    wa, wb = getattr(a, "weight", None), getattr(b, "weight", None)
    return isinstance(wa, torch.Tensor) and isinstance(wb, torch.Tensor) and (
        wa is wb or (wa.shape == wb.shape and wa.data_ptr() == wb.data_ptr()))


def model_matrices(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"U": input, "V": output} for untied models, {"tied": E} for tied ones, {"U": E} when the
    model has no output embedding. A model counts as tied when both sides are the same module or
    tensor, or when they hold identical values."""
    if not hasattr(model, "get_input_embeddings"):
        raise LmembedError(f"{type(model).__name__}: has no get_input_embeddings() (not an lmembed or "
                           "transformers model)")
    get_in = getattr(model, "get_decoder_input_embeddings", model.get_input_embeddings)  # seq2seq: target side
    inp = _core(get_in())
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    U = embedding_matrix(inp)
    if out is None:
        return {"U": U}
    out = _core(out)
    if out is inp or _same_tensor(inp, out):
        return {"tied": U}
    V = embedding_matrix(out)
    if V.shape == U.shape and torch.equal(U, V):
        return {"tied": U}
    return {"U": U, "V": V}


def agreement_sample(index: WordIndex, rows: int, pair_words: int, seed: int, top: int | None = None):
    """The word rows whose pairs the agreement and anisotropy are computed on (fixed by `seed`)."""
    word_rows = index.word_rows(rows if top is None else min(rows, top))
    return sample_rows(word_rows, pair_words, seed) if len(word_rows) > 1 else word_rows


# --- one model ------------------------------------------------------------------------------------

def _benchmarks(benchmarks):
    if benchmarks is None:
        benchmarks = DEFAULT_BENCHMARKS
    benches = [load_benchmark(b) for b in benchmarks]
    names = [b.name for b in benches]
    if len(set(names)) != len(names):
        raise LmembedError(f"benchmarks need distinct names, got {', '.join(names)}")
    return benches


def analyze_matrices(mats: dict[str, torch.Tensor], vocab, *, benchmarks=None, analogies: Any = DEFAULT_ANALOGIES,
                     words: Sequence[str] | None = None, k: int = 8, pair_words: int = 2000, seed: int = 0,
                     pair_top: int | None = None,
                     points: dict | None = None) -> dict[str, Any]:
    """The analysis of named V x d matrices that share one vocabulary (see ``analyze``)."""
    index = WordIndex.from_vocab(vocab)
    benches = _benchmarks(benchmarks)
    quest = load_analogies(analogies) if analogies else None
    words = list(DEFAULT_WORDS if words is None else words)
    rows = min(E.shape[0] for E in mats.values())
    sample = agreement_sample(index, rows, pair_words, seed, pair_top)
    result: dict[str, Any] = {"vocab_size": len(index), "rows": rows, "word_rows": len(index.word_rows(rows)),
                              "tied": "tied" in mats, "matrices": {}, "agreement": []}
    for name, E in mats.items():
        sims = {}
        for b in benches:
            r = word_similarity(E, index, b, keep_points=points is not None)
            if "points" in r:
                points[name] = points.get(name) or {}
                points[name][b.name] = r.pop("points")
            sims[b.name] = r
        result["matrices"][name] = {
            "shape": list(E.shape),
            "similarity": sims,
            "analogy": analogy_accuracy(E, index, quest) if quest else None,
            "spectrum": spectrum_stats(E),
            "norms": norm_stats(E),
            "mean_cosine": mean_cosine(E, sample),
            "neighbours": nearest_neighbours(E, index, words, k),
        }
    names = list(mats)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            result["agreement"].append({"a": a, "b": b, "spearman": similarity_agreement(mats[a], mats[b], sample),
                                        "pairs": len(sample) * (len(sample) - 1) // 2})
    result["settings"] = {"benchmarks": [b.source or b.name for b in benches],
                          "analogies": quest.source if quest else None, "words": words, "k": k,
                          "pair_words": int(len(sample)), "pair_top": pair_top, "seed": seed}
    return result


def analyze(model: nn.Module, vocab, *, benchmarks=None, analogies: Any = DEFAULT_ANALOGIES,
            words: Sequence[str] | None = None, k: int = 8, pair_words: int = 2000, seed: int = 0,
            pair_top: int | None = None) -> dict[str, Any]:
    """Analyse every embedding matrix of `model` (lmembed run model or transformers model).

    vocab: the model's tokenizer (lmembed or transformers), a token list or a {token: id} dict.
    benchmarks: names (simlex999, ws353) or ``word1 word2 score`` files; default SimLex-999 and WS-353.
    analogies: questions-words file or name, or None to skip. words: neighbour table words.
    pair_words: words sampled (with `seed`) for the matrix-to-matrix agreement and anisotropy;
    pair_top: sample them among the first N rows only (lmembed word vocabularies are sorted by
    frequency, so this means the N most frequent words).
    Returns a JSON-ready dict: per matrix similarity/analogy/spectrum/norms/neighbours, and the
    agreement between matrices.
    """
    return analyze_matrices(model_matrices(model), vocab, benchmarks=benchmarks, analogies=analogies, words=words,
                            k=k, pair_words=pair_words, seed=seed, pair_top=pair_top)


# --- runs and models ------------------------------------------------------------------------------

def apply_compression(model: nn.Module, spec: str) -> dict[str, Any]:
    """lmembed.compress(model, spec) in place; the report's JSON-able part."""
    report = compress(model, spec)
    plain = (int, float, str, bool, type(None), list, dict)
    return {k: v for k, v in report.items() if isinstance(v, plain)} if isinstance(report, dict) else {}


def _labels(specs: Sequence[str]) -> list[str]:
    base = [Path(s).name or str(s) for s in specs]
    return [b if base.count(b) == 1 else f"{b}#{i}" for i, b in enumerate(base)]


def analyze_targets(specs: Sequence[str], *, labels: Sequence[str] | None = None,
                    compress: str | Sequence[str | None] | None = None, device: str = "cpu", task: str = "auto",
                    log: Callable[[str], Any] = print, **kw) -> tuple[dict[str, Any], dict]:
    """Analyse several runs/models; matrices of targets with identical vocabularies are also compared
    with each other (e.g. an untied run's U and V against a tied run's matrix, or a compressed model
    against its original). `compress`: one lmembed.compress spec for every target, or one per target
    (None: as loaded); keyword arguments go to ``analyze_matrices``. Returns (JSON-ready result, plot data)."""
    labels = list(labels) if labels else _labels(specs)
    specs_c = list(compress) if isinstance(compress, (list, tuple)) else [compress] * len(specs)
    if len(specs_c) != len(specs) or len(labels) != len(specs):
        raise ValueError("analyze_targets: one label and one compress spec per target")
    seed, pair_words, pair_top = kw.get("seed", 0), kw.get("pair_words", 2000), kw.get("pair_top")
    targets, plot = [], {"spectra": {}, "points": {}}
    kept: list[tuple[str, tuple, dict[str, torch.Tensor], WordIndex]] = []
    for spec, label, comp in zip(specs, labels, specs_c, strict=True):
        log(f"analysing {spec}{f' compressed with {comp}' if comp else ''} ...")
        opened = open_model(spec, device=device, task=task)
        model, vocab, info = opened.model, opened.tokenizer, opened.info
        if comp:
            info["compression"] = {"spec": comp, "report": apply_compression(model, comp)}
        mats = model_matrices(model)
        del model
        points: dict = {}
        res = analyze_matrices(mats, vocab, points=points, **kw)
        res.update(target=str(spec), label=label, info=info)
        targets.append(res)
        index = WordIndex.from_vocab(vocab)
        for name, m in res["matrices"].items():
            plot["spectra"][f"{label}/{name}"] = m["spectrum"]["singular_values"]
        for name, p in points.items():
            plot["points"][f"{label}/{name}"] = p
        kept.append((label, tuple(index.tokens), mats, index))
    cross = []
    for i, (la, toks_a, ma, index) in enumerate(kept):
        for lb, toks_b, mb, _ in kept[i + 1:]:
            if toks_a != toks_b:
                continue
            rows = min(E.shape[0] for E in [*ma.values(), *mb.values()])
            sample = agreement_sample(index, rows, pair_words, seed, pair_top)
            for na, A in ma.items():
                for nb, B in mb.items():
                    cross.append({"a": f"{la}/{na}", "b": f"{lb}/{nb}", "spearman": similarity_agreement(A, B, sample),
                                  "pairs": len(sample) * (len(sample) - 1) // 2})
    return {"analysis": "embeddings", "targets": targets, "cross_agreement": cross}, plot


# --- reports --------------------------------------------------------------------------------------

def table_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per (target, matrix), for tables and benches."""
    rows = []
    for t in result["targets"]:
        for name, m in t["matrices"].items():
            row: dict[str, Any] = {"target": t["label"], "matrix": name, "shape": "x".join(map(str, m["shape"]))}
            for b, s in m["similarity"].items():
                row[b] = s["spearman"]
                row[f"{b}_n"] = f"{s['covered']}/{s['pairs']}"
            a = m.get("analogy")
            if a:
                row["analogy"] = a["accuracy"]
                row["analogy_n"] = f"{a['covered']}/{a['questions']}"
            row.update(effective_rank=m["spectrum"]["effective_rank"], rank90=m["spectrum"]["rank90"],
                       dim=m["spectrum"]["dim"], mean_norm=m["norms"]["mean"], mean_cosine=m["mean_cosine"])
            rows.append(row)
    return rows


def table_columns(result: dict[str, Any]) -> list[tuple[str, str]]:
    benches: list[str] = []
    for t in result["targets"]:
        for m in t["matrices"].values():
            benches += [b for b in m["similarity"] if b not in benches]
    cols = [("target", "target"), ("matrix", "matrix"), ("shape", "V x d")]
    for b in benches:
        cols += [(b, f"{b} rho"), (f"{b}_n", f"{b} pairs")]
    if any(m.get("analogy") for t in result["targets"] for m in t["matrices"].values()):
        cols += [("analogy", "analogy acc"), ("analogy_n", "analogy questions")]
    cols += [("effective_rank", "eff. rank"), ("rank90", "rank 90%"), ("dim", "d"), ("mean_norm", "mean norm"),
             ("mean_cosine", "mean cos")]
    return cols


def agreement_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for t in result["targets"]:
        rows += [{**a, "a": f"{t['label']}/{a['a']}", "b": f"{t['label']}/{a['b']}"} for a in t["agreement"]]
    return rows + list(result.get("cross_agreement", []))


def markdown_report(result: dict[str, Any]) -> str:
    from ..common.report import fmt, markdown_table

    lines = ["# Embedding analysis", "",
             "Word similarity: Spearman rho between human scores and cosine similarity, on the pairs whose "
             "words are single tokens (pairs column: covered/total). Analogy: 3CosAdd accuracy on covered "
             "questions. Effective rank: RankMe (exp of the entropy of the normalised singular values); "
             "rank 90%: singular directions holding 90% of the energy; mean cos: average cosine of sampled "
             "word pairs (anisotropy).", "", markdown_table(table_rows(result), table_columns(result))]
    agree = agreement_rows(result)
    if agree:
        lines += ["## Matrix agreement", "",
                  "Spearman between the cosine similarities two matrices give the same sampled word pairs "
                  "(1 = they rank word similarity identically).", "",
                  markdown_table(agree, [("a", "matrix A"), ("b", "matrix B"), ("spearman", "Spearman"),
                                         ("pairs", "word pairs")])]
    for t in result["targets"]:
        for name, m in t["matrices"].items():
            nb = m["neighbours"]
            if not nb:
                continue
            lines += [f"## Nearest neighbours: {t['label']} / {name}", "", "| word | neighbours (cosine) |",
                      "| --- | --- |"]
            for w, lst in nb.items():
                cell = "not a single token" if lst is None else ", ".join(f"{tok} ({fmt(c)})" for tok, c in lst)
                lines.append(f"| {w} | {cell.replace('|', '/')} |")
            lines.append("")
    lines += ["![singular value spectra](spectra.png)", "", "![human score vs cosine](similarity.png)", ""]
    return "\n".join(lines)


def write_analysis(result: dict[str, Any], plot: dict, out: str | Path) -> None:
    """analysis.json, analysis.md, spectra.png (normalised singular values), similarity.png
    (human score vs cosine per matrix, first benchmark) into an existing folder."""
    from ..common.files import write_json
    from ..common.report import plot_curves, plot_panels, write_text

    out = Path(out)
    write_json(out / "analysis.json", result)
    write_text(out / "analysis.md", markdown_report(result))
    spectra = {k: (list(range(1, len(s) + 1)), [v / s[0] for v in s]) for k, s in plot["spectra"].items() if s and s[0]}
    plot_curves(out / "spectra.png", spectra, xlabel="index", ylabel="singular value / largest", logy=True,
                title="singular value spectra", markers=False)
    panels = {}
    for name, per_bench in plot["points"].items():
        if per_bench:
            bench, (human, cos) = next(iter(per_bench.items()))
            panels[f"{name} ({bench})"] = (list(map(float, human)), list(map(float, cos)))
    plot_panels(out / "similarity.png", panels, xlabel="human score", ylabel="cosine")

