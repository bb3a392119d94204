"""What `lmembed compress` tells the user at the end: sizes before and after, and the quality cost."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..common.report import markdown_table
from ..common.steps import Steps, human_bytes
from ..compression.integration.body import cast_body, state_bytes
from ..compression.integration.open import Opened, open_model
from ..models.pretrained import BUNDLED_MODELS, bundled_name, resolve_model
from ..models.sizes import DTYPES, files_bytes, source_dtype, weight_files

METRIC_NAMES = {"ppl": "perplexity", "pseudo_ppl": "pseudo-perplexity", "sentence_cosine": "sentence cosine"}


@dataclass
class Sizes:
    """The source's bytes on disk and dtype; the body dtype chosen for the output."""

    source_files: list[Path] = field(default_factory=list)
    source_dtype: torch.dtype | None = None
    params: int = 0
    embedding_params: int = 0
    body_dtype: torch.dtype | None = None
    after_bytes: int = 0

    def set_body(self, model: torch.nn.Module, dtype: str) -> None:
        """Cast the rest of the model to `dtype` (auto: the source's, when it says)."""
        target = DTYPES.get(dtype) if dtype != "auto" else self.source_dtype
        if target is not None:
            cast_body(model, target)
        self.body_dtype = target or next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        self.after_bytes = state_bytes(model)

    def report(self) -> dict[str, Any]:
        return {"source_files": [f.name for f in self.source_files], "source_bytes": files_bytes(self.source_files),
                "params": self.params, "embedding_params": self.embedding_params,
                "body_dtype": str(self.body_dtype).removeprefix("torch.") if self.body_dtype else None,
                "tensor_bytes": self.after_bytes}

    @staticmethod
    def saved_bytes(out: Path) -> int:
        return files_bytes([f for f in out.iterdir() if f.suffix == ".safetensors"]) if out.is_dir() else 0


def open_source(spec: str, steps: Steps) -> tuple[Opened, Sizes]:
    """The model to compress, opened as one visible step, with what it weighs on disk."""
    bundled = BUNDLED_MODELS.get(bundled_name(spec) or "")
    if bundled is not None and bundled.gguf_file:
        steps.say(f"load: {spec} (its first use converts the bundled GGUF to a cached fp32 folder, about 30 s)")
    with steps.step("load") as s:
        opened = open_model(spec)
        sizes = _sizes(spec, opened)
        s.note = (f"{spec}: {sizes.params / 1e6:.1f}M parameters, embedding {sizes.embedding_params / 1e6:.1f}M "
                  f"({100 * sizes.embedding_params / max(sizes.params, 1):.0f} %)")
    return opened, sizes


def _sizes(spec: str, opened: Opened) -> Sizes:
    model = opened.model
    emb = model.get_input_embeddings()
    weight = getattr(emb, "weight", None)
    sizes = Sizes(params=sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
                  embedding_params=weight.numel() if weight is not None else 0)
    if opened.kind != "pretrained":
        sizes.source_files = weight_files(Path(opened.source)) if Path(opened.source).is_dir() else []
        return sizes
    bundled = BUNDLED_MODELS.get(bundled_name(spec) or "")
    if bundled is not None and bundled.gguf_file:  # what the user has is the GGUF, not lmembed's fp32 copy
        from ..data.bundled import package_dir

        folder, gguf = package_dir(bundled.package, bundled.install_hint) / bundled.subdir, bundled.gguf_file
    else:
        where, gguf = resolve_model(spec)
        folder = Path(where)
    if folder.is_dir():
        sizes.source_files = weight_files(folder, gguf)
        sizes.source_dtype = source_dtype(folder, gguf)
    return sizes


@dataclass
class Quality:
    metric: str = ""
    text: str = ""
    settings: str = ""
    before: float | None = None
    after: float | None = None
    delta_pct: float | None = None

    @classmethod
    def of(cls, report: dict[str, Any]) -> Quality | None:
        e = report.get("eval")
        if not e:
            return None
        m = e["metric"]
        return cls(m, e["text"], e.get("settings", ""), e["dense"][m], e["compressed"][m], e["delta_pct"])


def summary_table(model_spec: str, report: dict[str, Any], quality: Quality | None) -> str:
    """Embedding, whole model and quality, before and after, as one Markdown table."""
    w = report["whole_model"]
    v, d = report["shape"]
    emb_before = f"{v:,} x {d}, {human_bytes(report['dense_fp32_bytes'])} in fp32"
    emb_after = f"{report['method']}: {human_bytes(report['stored_bytes'])} ({report['ratio']:.2f}x smaller)"
    src = ", ".join(w["source_files"]) or "in memory"
    body = w["body_dtype"] or "as loaded"
    rows = [{"": "token embedding", "before": emb_before, "after": emb_after},
            {"": "whole model", "before": f"{human_bytes(w['source_bytes'])} ({src})" if w["source_bytes"] else "-",
             "after": f"{human_bytes(w['tensor_bytes'])} ({body} rest of the model)"}]
    if quality is not None:
        name = METRIC_NAMES.get(quality.metric, quality.metric)
        rows.append({"": f"{name}, {quality.text} ({quality.settings})", "before": f"{quality.before:.4g}",
                     "after": f"{quality.after:.4g} ({quality.delta_pct:+.2f} %)"})
    return markdown_table(rows, ["", "before", "after"])
