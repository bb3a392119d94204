"""`lmembed.finetune(model, task, out)`: fine-tune an encoder (dense or with compressed token
embeddings) for sequence classification, over several seeds, and report accuracy and macro-F1.

Bałazy et al. judge compressed embeddings by downstream fine-tuning too; this runs that check on
any labelled text task. The classifier is the encoder, a pooled sentence vector (mean over the
tokens by default, as sentence encoders such as MiniLM are trained) and a linear layer, trained
with AdamW, linear warm-up then linear decay, gradient clipping at 1, dropout as the encoder's
config has it. The validation split is scored ``evals_per_epoch`` times per epoch (the learning
curve); the final model is scored on validation and test.

What the token embeddings may learn (``embeddings``):

- ``train`` (default): every parameter of the embedding module: a dense matrix; the codes, the
  decoder and its bias of a factorisation (svd, ae); the fp16 scales of integer codes
  (``train_scales``, kept in fp32 while training and rounded back to fp16, their stored form,
  before the final scores). Integer codes themselves never change.
- ``decoder``: the paper's protocol (its code freezes the low-rank codes and trains only the
  decoder): a factorisation trains its decoder and bias, integer codes train nothing, and a dense
  matrix, which has no decoder, is fine-tuned as in ``train``.
- ``freeze``: the token-embedding module is frozen (position and type embeddings still train).

Each seed's result is written to ``OUT/seeds/seed-N.json`` as soon as it is done, so an
interrupted run resumes with the next seed. Same seed, same numbers on CPU.
"""

from __future__ import annotations

import inspect
import json
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..common.files import read_json, remove_owned, write_json
from ..common.locks import holds_lock
from ..common.report import fmt, markdown_table, plot_curves, write_text
from ..common.runtime import pick_device, seed_everything
from ..compression.formats.base import CompressedEmbedding
from ..compression.integration.open import open_model
from ..config import EMBEDDING_MODES, FinetuneConfig
from ..errors import LmembedError
from ..evaluation.classification import classification_metrics
from ..tasks import SPLITS, Split, TextTask, load_task
from .loop import run_steps

FINETUNE_FILES = ("settings.json", "seeds", "finetune.json", "finetune.md", "curves.png", "loss.png")


# --- the model -----------------------------------------------------------------------------------
def load_encoder(spec: str | Path) -> tuple[nn.Module, Any]:
    """(encoder without any head, tokenizer) from a compressed folder (lmembed.save), a bundled
    name, a local transformers folder or a hub id."""
    opened = open_model(spec, task="base")
    if opened.kind in ("run", "seq2seq-run") or opened.run_config is not None:
        raise LmembedError(f"{spec}: an lmembed language-model run, not a text encoder; fine-tune a "
                           "transformers model or a compressed folder of one")
    if opened.tokenizer is None or not callable(opened.tokenizer):
        raise LmembedError(f"{spec}: no usable tokenizer files; save the compressed model with "
                           "lmembed.save(model, dir, tokenizer=tok)")
    model = opened.model
    encoder = getattr(model, "base_model", model)
    if not callable(getattr(encoder, "get_input_embeddings", None)) or encoder.get_input_embeddings() is None:
        raise LmembedError(f"{spec}: {type(model).__name__} has no input token embeddings")
    return encoder, opened.tokenizer


class SequenceClassifier(nn.Module):
    """encoder -> pooled hidden state -> dropout -> linear layer over the classes."""

    def __init__(self, encoder: nn.Module, num_labels: int, pooling: str = "mean"):
        super().__init__()
        cfg = getattr(encoder, "config", None)
        hidden = getattr(cfg, "hidden_size", None) or encoder.get_input_embeddings().embedding_dim
        p = getattr(cfg, "hidden_dropout_prob", None)
        self.encoder = encoder
        self.pooling = pooling
        self.dropout = nn.Dropout(0.1 if p is None else float(p))
        self.head = nn.Linear(hidden, num_labels)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self._accepts = set(inspect.signature(encoder.forward).parameters)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        kw = {"token_type_ids": token_type_ids} if token_type_ids is not None and "token_type_ids" in self._accepts \
            else {}
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state
        return self.head(self.dropout(pool(h, attention_mask, self.pooling)))


def pool(h: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """(batch, seq, d) -> (batch, d): masked mean, first token, or last real token (right padding)."""
    if how == "cls":
        return h[:, 0]
    if how == "last":
        last = mask.sum(1).clamp_min(1) - 1
        return h[torch.arange(h.shape[0], device=h.device), last]
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1)


# --- what the embeddings may learn ---------------------------------------------------------------
def scaled_parts(module: nn.Module) -> list[CompressedEmbedding]:
    """The compressed modules inside `module` whose fp16 scales may train (tunable_scales)."""
    return [m for m in module.modules() if isinstance(m, CompressedEmbedding) and m.tunable_scales]


def unfreeze_scales(q: CompressedEmbedding) -> None:
    """Turn the fp16 scale buffer into an fp32 Parameter (Adam's state cannot live in fp16)."""
    if isinstance(q.scales, nn.Parameter):
        return
    s = q.scales.detach().float()
    delattr(q, "scales")
    q.scales = nn.Parameter(s)


def freeze_scales(q: CompressedEmbedding) -> None:
    """Back to the stored form: an fp16 buffer (what lmembed.save writes and stored_bytes counts)."""
    if not isinstance(q.scales, nn.Parameter):
        return
    s = q.scales.detach().to(torch.float16)
    delattr(q, "scales")
    q.register_buffer("scales", s)


def set_embedding_training(encoder: nn.Module, mode: str, train_scales: bool = True) -> dict[str, Any]:
    """Freeze / unfreeze the token-embedding module per `mode`; returns what trains, for the report."""
    emb = encoder.get_input_embeddings()
    emb.requires_grad_(mode == "train")
    if mode == "train" and train_scales:
        for q in scaled_parts(emb):
            unfreeze_scales(q)
    if mode == "decoder":
        plain = emb.plain_parameter() is not None if isinstance(emb, CompressedEmbedding) else isinstance(
            emb, nn.Embedding)
        if plain:
            emb.requires_grad_(True)  # no decoder: a dense matrix is fine-tuned as usual
        for part in (m for m in emb.modules() if isinstance(m, CompressedEmbedding)):  # also inside containers
            for p in part.decoder_parameters():
                p.requires_grad_(True)
    trainable = [n for n, p in emb.named_parameters() if p.requires_grad]
    return {"mode": mode, "trainable": trainable,
            "trainable_params": sum(p.numel() for p in emb.parameters() if p.requires_grad)}


def embedding_info(encoder: nn.Module) -> dict[str, Any]:
    """Kind, method, shape and stored bytes of the token embeddings (dense counted in fp32)."""
    emb = encoder.get_input_embeddings()
    if isinstance(emb, CompressedEmbedding):
        v, d = emb.num_embeddings, emb.embedding_dim
        stored, kind, method = emb.stored_bytes(), emb.kind, emb.method or emb.kind
    else:
        v, d = emb.weight.shape
        stored, kind, method = emb.weight.numel() * 4, "dense", "dense"
    return {"kind": kind, "method": method, "shape": [int(v), int(d)], "stored_bytes": int(stored),
            "ratio": v * d * 4 / stored}


# --- data ----------------------------------------------------------------------------------------
@dataclass
class Encoded:
    ids: list[list[int]]
    types: list[list[int]] | None
    labels: list[int]


def encode(tok: Any, split: Split, max_length: int) -> Encoded:
    """Token ids of a split, truncated to max_length (no padding: batches pad to their longest)."""
    args = (split.texts,) if split.pairs is None else (split.texts, split.pairs)
    enc = tok(*args, truncation=True, max_length=max_length)
    types = enc.get("token_type_ids")
    return Encoded(list(enc["input_ids"]), list(types) if types is not None else None, list(split.labels))


def collate(data: Encoded, idx: Sequence[int], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    n = max(len(data.ids[i]) for i in idx)
    ids = torch.full((len(idx), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(idx), n), dtype=torch.long)
    types = torch.zeros((len(idx), n), dtype=torch.long) if data.types is not None else None
    for r, i in enumerate(idx):
        row = data.ids[i]
        ids[r, : len(row)] = torch.tensor(row)
        mask[r, : len(row)] = 1
        if types is not None:
            types[r, : len(row)] = torch.tensor(data.types[i])
    out = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    if types is not None:
        out["token_type_ids"] = types.to(device)
    return out


@torch.no_grad()
def evaluate(model: SequenceClassifier, data: Encoded, num_labels: int, *, pad_id: int, batch_size: int,
             device: torch.device) -> dict[str, float]:
    """Accuracy and macro-F1 of the model on an encoded split (batches of similar lengths)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(data.labels)), key=lambda i: len(data.ids[i]))
    preds = [0] * len(order)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        logits = model(**collate(data, idx, pad_id, device))
        for i, p in zip(idx, logits.argmax(-1).tolist(), strict=True):
            preds[i] = p
    model.train(was_training)
    return classification_metrics(preds, data.labels, num_labels)


# --- one seed ------------------------------------------------------------------------------------
def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or name.endswith("scales") or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def eval_steps(steps_per_epoch: int, epochs: int, per_epoch: int) -> dict[int, float]:
    """Optimizer step -> epoch (fractional) at which the validation split is scored."""
    out: dict[int, float] = {}
    for e in range(epochs):
        for j in range(1, per_epoch + 1):
            out[e * steps_per_epoch + math.ceil(j * steps_per_epoch / per_epoch)] = e + j / per_epoch
    return out


def epochs_to_fraction(history: list[dict[str, Any]], key: str = "valid_accuracy", frac: float = 0.99
                       ) -> float | None:
    """First epoch of the curve at which `key` reaches frac x its final value."""
    if not history:
        return None
    target = frac * history[-1][key]
    return next(h["epoch"] for h in history if h[key] >= target)


@dataclass
class SeedRun:
    """The pieces of one seed's fine-tuning, shared by its step loop and its evaluations."""

    model: SequenceClassifier
    data: dict[str, Encoded]
    num_labels: int
    pad_id: int
    cfg: FinetuneConfig
    device: torch.device

    def score(self, split: str) -> dict[str, float]:
        return evaluate(self.model, self.data[split], self.num_labels, pad_id=self.pad_id,
                        batch_size=self.cfg.eval_batch_size, device=self.device)


def linear_schedule(lr: float, warm: int, total: int) -> Callable[[int], float]:
    """Linear warm-up over `warm` steps, then linear decay to zero at `total`."""
    return lambda s: lr * ((s + 1) / (warm + 1) if s < warm else max(0.0, (total - s) / max(1, total - warm)))


def train_seed(model_spec: str | Path, task: TextTask, cfg: FinetuneConfig, seed: int, *,
               progress: bool | None = None, log=print) -> dict[str, Any]:
    """Fine-tune a fresh copy of the encoder with one seed; returns curve and final scores."""
    cfg.validate()
    device = pick_device(cfg.device)
    seed_everything(seed)
    encoder, tok = load_encoder(model_spec)
    info = embedding_info(encoder)
    trains = set_embedding_training(encoder, cfg.embeddings, cfg.train_scales)
    model = SequenceClassifier(encoder, task.num_labels, cfg.pooling).to(device)
    model.train()
    run = SeedRun(model, {s: encode(tok, task.splits[s], cfg.max_length) for s in SPLITS}, task.num_labels,
                  tok.pad_token_id if tok.pad_token_id is not None else 0, cfg, device)
    t0 = time.perf_counter()
    history, steps = _fit(run, seed, progress, log)
    for q in scaled_parts(encoder.get_input_embeddings()):
        freeze_scales(q)  # score the stored (fp16) form
    final = {f"{s}_{k}": v for s in ("valid", "test") for k, v in run.score(s).items()}
    seconds = time.perf_counter() - t0
    log(f"seed {seed}: test accuracy {final['test_accuracy']:.4f}, macro-F1 {final['test_macro_f1']:.4f} "
        f"({seconds:.0f} s)")
    return {"seed": seed, "history": history, **final, "epochs_to_99": epochs_to_fraction(history),
            "steps": steps, "train_examples": len(run.data["train"].labels), "seconds": seconds,
            "embeddings": trains, "embedding_info": info, "device": str(device),
            "tokens_truncated": _truncated(run.data, cfg.max_length)}


def _fit(run: SeedRun, seed: int, progress: bool | None, log) -> tuple[list[dict[str, Any]], int]:
    """The optimizer steps of all epochs (shuffled per epoch) with the validation curve."""
    cfg, train = run.cfg, run.data["train"]
    n = len(train.labels)
    per_epoch = math.ceil(n / cfg.batch_size)
    total = per_epoch * cfg.epochs
    opt = torch.optim.AdamW(_param_groups(run.model, cfg.weight_decay), lr=cfg.lr)
    evals = eval_steps(per_epoch, cfg.epochs, cfg.evals_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    history: list[dict[str, Any]] = []
    running = [0.0, 0]  # loss x examples, examples since the last evaluation
    t0 = time.perf_counter()

    def step_loss(step: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        nonlocal order
        if step % per_epoch == 0:
            order = torch.randperm(n, generator=gen).tolist()
        start = (step % per_epoch) * cfg.batch_size
        idx = order[start : start + cfg.batch_size]
        labels = torch.tensor([train.labels[i] for i in idx], device=run.device)
        loss = F.cross_entropy(run.model(**collate(train, idx, run.pad_id, run.device)), labels)
        return loss, loss, len(idx)

    def after_step(step: int, loss: float, count: int) -> None:
        running[0] += loss * count
        running[1] += count
        if step + 1 in evals:
            m = run.score("valid")
            history.append({"epoch": evals[step + 1], "step": step + 1, "train_loss": running[0] / running[1],
                            "valid_accuracy": m["accuracy"], "valid_macro_f1": m["macro_f1"],
                            "seconds": time.perf_counter() - t0})
            if not progress:
                h = history[-1]
                log(f"seed {seed} epoch {h['epoch']:.2f}: train loss {h['train_loss']:.4f}, valid accuracy "
                    f"{h['valid_accuracy']:.4f} ({h['seconds']:.0f} s)")
            running[:] = [0.0, 0]

    run_steps(run.model, opt, step_loss, n_steps=total, lr=linear_schedule(cfg.lr, int(cfg.warmup * total), total),
              clip=cfg.clip, device=run.device, desc=f"seed {seed}", progress=progress, after_step=after_step,
              diverged=lambda mean, step: f"seed {seed}: loss became {mean} at step {step}; lower --lr")
    return history, total


def _truncated(data: dict[str, Encoded], max_length: int) -> dict[str, int]:
    return {s: sum(len(x) >= max_length for x in d.ids) for s, d in data.items()}


# --- several seeds, reports ----------------------------------------------------------------------
def mean_std(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation (n - 1; None for a single value) of the non-missing values."""
    vals = [v for v in values if v is not None]
    return {"mean": statistics.fmean(vals) if vals else None,
            "std": statistics.stdev(vals) if len(vals) > 1 else None, "values": list(values)}


def pm(stat: dict[str, Any], scale: float = 1.0, digits: int = 2) -> str:
    """'mean ± std' for tables ('-' when missing)."""
    if stat.get("mean") is None:
        return "-"
    if stat.get("std") is None:
        return f"{stat['mean'] * scale:.{digits}f}"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


SUMMARY_KEYS = ("test_accuracy", "test_macro_f1", "valid_accuracy", "valid_macro_f1", "epochs_to_99", "seconds")


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    out = {k: mean_std([r.get(k) for r in results]) for k in SUMMARY_KEYS}
    curves = [r["history"] for r in results if r["history"]]
    if curves:
        epochs = [h["epoch"] for h in curves[0]]
        out["mean_curve"] = {"epoch": epochs, "valid_accuracy": [
            statistics.fmean(c[i]["valid_accuracy"] for c in curves) for i in range(len(epochs))]}
    return out


def finetune_settings(model_spec: str | Path, task: TextTask, cfg: FinetuneConfig) -> dict[str, Any]:
    return json.loads(json.dumps({"model": str(model_spec), "task": task.summary(), "config": cfg.to_dict()}))


def open_run_dir(out: Path, settings: dict[str, Any], *, force: bool, what: str,
                 owned: tuple[str, ...] = FINETUNE_FILES) -> None:
    """A fresh folder, or one holding the same settings (resume); anything else needs --force,
    which removes only the entries `owned` (a user's other files stay)."""
    marker = out / "settings.json"
    if out.exists() and not out.is_dir():
        raise LmembedError(f"{out}: exists and is not a directory")
    if force and out.is_dir():
        remove_owned(out, owned)
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not marker.is_file():
            raise LmembedError(f"{out}: not empty and not a {what} folder; pass --force to overwrite it")
        if read_json(marker, f"{what} settings") != settings:
            raise LmembedError(f"{marker}: this folder holds a {what} with other settings; pass --force to start "
                               "over or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json(marker, settings)


@holds_lock("finetune folder")
def finetune(model: str | Path, task: str | TextTask, out: str | Path, *, config: FinetuneConfig | None = None,
             seeds: Sequence[int] = (0,), split_seed: int = 0, task_options: dict[str, Any] | None = None,
             force: bool = False, progress: bool | None = None, log=print) -> dict[str, Any]:
    """Fine-tune `model` on `task` once per seed; write OUT/finetune.{json,md} and curves PNGs.

    model: a compressed folder (lmembed.save), a bundled name, a transformers folder or hub id.
    task: a TextTask, or a spec for lmembed.tasks.load_task (task_options: text_col, label_col, fmt).
    """
    cfg = config or FinetuneConfig()
    cfg.validate()
    if not seeds:
        raise LmembedError("--seeds: give at least one seed")
    if isinstance(task, (str, Path)):
        task = load_task(task, split_seed=split_seed, log=log, **(task_options or {}))
    task = task.limit_train(cfg.max_train, seed=split_seed)
    out = Path(out)
    open_run_dir(out, finetune_settings(model, task, cfg), force=force, what="finetune run")
    results = []
    for seed in seeds:
        path = out / "seeds" / f"seed-{seed}.json"
        if path.is_file():
            results.append(read_json(path, "finetune seed result"))
            log(f"seed {seed}: cached ({path})")
            continue
        res = train_seed(model, task, cfg, seed, progress=progress, log=log)
        write_json(path, res)
        results.append(res)
    report = {"model": str(model), "task": task.summary(), "config": cfg.to_dict(), "seeds": list(seeds),
              "embedding": results[0]["embedding_info"], "trainable": results[0]["embeddings"],
              "summary": summarize(results), "results": results}
    write_report(out, report)
    return report


def write_report(out: Path, report: dict[str, Any]) -> None:
    write_json(out / "finetune.json", report)
    results, s = report["results"], report["summary"]
    curves = {f"seed {r['seed']}": ([h["epoch"] for h in r["history"]], [h["valid_accuracy"] for h in r["history"]])
              for r in results}
    plot_curves(out / "curves.png", curves, xlabel="epoch", ylabel="validation accuracy",
                title=f"{Path(report['model']).name} on {report['task']['name']}")
    losses = {f"seed {r['seed']}": ([h["epoch"] for h in r["history"]], [h["train_loss"] for h in r["history"]])
              for r in results}
    plot_curves(out / "loss.png", losses, xlabel="epoch", ylabel="training loss (mean since last evaluation)",
                title=f"{Path(report['model']).name} on {report['task']['name']}")
    rows = [{"seed": r["seed"], "test_accuracy": 100 * r["test_accuracy"], "test_macro_f1": 100 * r["test_macro_f1"],
             "valid_accuracy": 100 * r["valid_accuracy"], "epochs_to_99": r["epochs_to_99"],
             "seconds": r["seconds"]} for r in results]
    rows.append({"seed": "mean ± std", "test_accuracy": pm(s["test_accuracy"], 100),
                 "test_macro_f1": pm(s["test_macro_f1"], 100), "valid_accuracy": pm(s["valid_accuracy"], 100),
                 "epochs_to_99": pm(s["epochs_to_99"]), "seconds": pm(s["seconds"], digits=0)})
    table = markdown_table(rows, [("seed", "seed"), ("test_accuracy", "test acc %"), ("test_macro_f1", "test F1 %"),
                                  ("valid_accuracy", "valid acc %"), ("epochs_to_99", "epochs to 99 %"),
                                  ("seconds", "seconds")])
    t, e, c = report["task"], report["embedding"], report["config"]
    sizes = ", ".join(f"{k} {fmt(v)}" for k, v in t["sizes"].items())
    text = (f"# Fine-tuning {report['model']} on {t['name']}\n\n"
            f"Task: {t['source']}; {sizes}; classes {', '.join(t['labels'])}; {t['split_rule']}.\n\n"
            f"Token embeddings: {e['method']} ({e['kind']}, {fmt(e['stored_bytes'])} bytes, {e['ratio']:.2f}x vs "
            f"fp32); mode `{c['embeddings']}`, trainable embedding parameters: "
            f"{fmt(report['trainable']['trainable_params'])}.\n\n"
            f"Settings: {c['epochs']} epochs, lr {c['lr']:g}, batch {c['batch_size']}, max length "
            f"{c['max_length']}, warm-up {c['warmup']:g}, {c['pooling']} pooling; std over seeds is the sample "
            "std (n - 1). Epochs to 99 %: first evaluation at which the validation accuracy reaches 99 % of its "
            f"final value.\n\n{table}\n![validation accuracy](curves.png)\n\n![training loss](loss.png)\n")
    write_text(out / "finetune.md", text)


def iter_seeds(seed: int, n: int) -> Iterator[int]:
    """--seed S --seeds N -> S, S+1, ..., S+N-1."""
    if n < 1:
        raise LmembedError(f"--seeds {n}: must be at least 1")
    return iter(range(seed, seed + n))


__all__ = ["FinetuneConfig", "finetune", "train_seed", "load_encoder", "SequenceClassifier",
           "set_embedding_training", "embedding_info", "summarize", "iter_seeds", "EMBEDDING_MODES"]
