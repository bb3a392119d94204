"""Calibration statistics: what a tied matrix's two roles see when the original model runs.

One forward pass of the *original* model over a calibration text collects:

- ``hidden_moment`` H = E[h hᵀ] (d x d) of the final hidden states h that feed the output layer.
  An error ΔE in the output matrix changes the logits by h·ΔEᵀ, so its expected squared size is
  Σ_v ΔE_v H ΔE_vᵀ: directions in which h has large energy matter, the others hardly do.
- ``out_prob`` (V,): the mean predicted probability of each token. The logit error of a token
  the model never predicts barely moves the softmax; a token with probability p weighs ~p.
- ``in_freq`` (V,): how often each token is an input, i.e. how often its row is looked up.
- ``input_fisher`` G = E[g gᵀ] (d x d) of the gradients g at the input embeddings, for next
  tokens drawn from the model (FISHER_TOKENS positions, one backward pass each window): what an
  input-row error costs the loss, to second order, on the same scale as H (tc uses H + G).

Besides a text (a file, a bundled corpus, token ids), two built-in sources need no text from the
user's domain, which nobody knows in advance:

- ``model``: text sampled from the model itself (temperature 1, from its BOS token, a fixed number
  of sequences in parallel, a seeded generator). The statistics are gathered *while* sampling, so
  there is no second pass; ``in_freq`` is the expected count Σ_t p_t (the sampled tokens are the
  next inputs), which is smooth over the whole vocabulary instead of zero for unseen tokens.
- ``mix``: equal shares of the bundled corpora (news, Shakespeare), one forward pass.
- ``model+mix``: half of each.

Measured on Wikipedia article leads (a domain none of the bundled corpora covers; SmolLM2-135M,
both sides compressed), see DEFAULT_CALIB for the numbers that made ``model`` the default.

Statistics are cached on disk, keyed by the matrix, the text's token ids (or the source and its
sampling settings) and the budget, so a bench that calibrates ten methods runs the model once.
An entry records the digest of those inputs and of its content and is computed again, with one
line saying so, when either does not match (lmembed.common.cache).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ...common.cache import content_digest, content_hash, note
from ...common.files import atomic_torch_save
from ...errors import LmembedError
from ..integration.sites import find_sites

DEFAULT_TOKENS = 16_384
# Built-in sources (no user text) and their default budgets in tokens: sampling costs one forward
# step per token batch, so the model source is kept small; its statistics are smooth already.
SOURCES = {"model": 4096, "mix": 8192, "model+mix": 8192}
MIX_TEXTS = ("lee:train", "shakespeare:train")
DEFAULT_CALIB = "model"
SAMPLE_BATCH = 16  # sequences sampled in parallel
PROB_ROWS = 256  # positions whose probabilities are formed at once (a 256 x V float block)
SAMPLE_LENGTH = 256  # tokens per sampled sequence (capped by the model's context)
CALIB_VERSION = "4"  # part of every cache key (3: the input Fisher; 4: entries record their digests)
FISHER_TOKENS = 1024  # positions whose input-embedding gradients make the input Fisher


@dataclass
class CalibStats:
    hidden_moment: torch.Tensor | None  # d x d float64, None without an output layer
    out_prob: torch.Tensor | None  # (V,) float64
    in_freq: torch.Tensor  # (V,) float64 token counts
    tokens: int
    source: str
    dim: int
    hidden_sample: torch.Tensor | None = None  # (n, d) float32: a sample of h for fine-tuning
    input_fisher: torch.Tensor | None = None  # d x d float64: G = E[g gᵀ] at the input embeddings

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def row_weights(self, side: str, *, mix: float = 0.5, floor: float = 0.1) -> torch.Tensor:
        """Importance of each row for the given role, normalised to mean 1.

        output: mean predicted probability; input: frequency; tied: `mix` of both. `floor` (a
        fraction of the mean) keeps rare rows from being ignored altogether."""
        parts = []
        if side in ("output", "tied") and self.out_prob is not None:
            parts.append((mix if side == "tied" else 1.0, self.out_prob))
        if side in ("input", "tied") or not parts:
            parts.append((1 - mix if side == "tied" and parts else 1.0, self.in_freq))
        w = sum(a * p / p.mean().clamp_min(1e-30) for a, p in parts)
        w = w / w.mean()
        return (w + floor) / (1 + floor)

    def column_metric(self, side: str, *, mix: float = 0.5) -> torch.Tensor:
        """d x d metric M for row errors (ΔE M ΔEᵀ), trace-normalised to d.

        output: H; input: identity (no model-specific knowledge of the first layer); tied: a mix."""
        if self.hidden_moment is None or side == "input":
            return torch.eye(self.dim, dtype=torch.float64)
        h = self.hidden_moment
        h = h * (h.shape[0] / torch.trace(h))
        if side == "output":
            return h
        return mix * h + (1 - mix) * torch.eye(h.shape[0], dtype=h.dtype)


class _Moments:
    """Running sums of what the output layer sees: H, mean probabilities, input counts, a sample of h."""

    def __init__(self, vocab: int, dim: int):
        self.v, self.d, self.n = vocab, dim, 0
        self.moment = torch.zeros(dim, dim, dtype=torch.float64)
        self.prob = torch.zeros(vocab, dtype=torch.float64)
        self.in_freq = torch.zeros(vocab, dtype=torch.float64)
        self.hs: list[torch.Tensor] = []

    def add(self, h: torch.Tensor, logits: torch.Tensor) -> torch.Tensor | None:
        """Fold in hidden states (n, d) and their logits (n, >=V); returns the probabilities (n, V)
        when n <= PROB_ROWS (a sampling step), else None."""
        h = h.reshape(-1, self.d).double().cpu()
        logits = logits.reshape(-1, logits.shape[-1])
        p = None  # softmax a few hundred positions at a time: never a second (positions x V) float copy
        for s in range(0, len(logits), PROB_ROWS):
            p = torch.softmax(logits[s : s + PROB_ROWS].float(), -1)[:, : self.v]
            self.prob += p.double().sum(0).cpu()
        self.moment += h.t() @ h
        self.hs.append(h.float())
        self.n += len(h)
        return p if len(logits) <= PROB_ROWS else None

    def stats(self, source: str, sample: int, seed: int) -> CalibStats:
        all_h = torch.cat(self.hs)
        pick = torch.randperm(len(all_h), generator=torch.Generator().manual_seed(seed))[: min(sample, len(all_h))]
        return CalibStats(self.moment / self.n, self.prob / self.n, self.in_freq, self.n, source, self.d,
                          all_h[pick].contiguous())


def _cache_dir() -> Path:
    env = os.environ.get("LMEMBED_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "lmembed") / "calib"


def calibration_ids(calib: Any, tokenizer: Any, vocab_size: int, tokens: int) -> tuple[torch.Tensor, str]:
    """Token ids from a text spec / raw string (needs the tokenizer) or given ids; checked."""
    if isinstance(calib, (torch.Tensor, np.ndarray, list, tuple)):
        ids = torch.as_tensor(np.asarray(calib), dtype=torch.long).flatten()
        source = f"{len(ids)} given token ids"
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            bad = int(ids.max()) if int(ids.max()) >= vocab_size else int(ids.min())
            raise LmembedError(f"calibration ids: id {bad} is outside the model's vocabulary 0..{vocab_size - 1} "
                               "(ids from another tokenizer?)")
    elif isinstance(calib, (str, Path)):
        ids = _text_ids(str(calib), tokenizer, vocab_size)
        source = str(calib)
    else:
        raise LmembedError(f"calib: expected a text spec, a file, token ids or one of {', '.join(SOURCES)}, "
                           f"not {type(calib).__name__}")
    if len(ids) == 0:
        raise LmembedError(f"calibration {source}: empty (no tokens)")
    if len(ids) < tokens:
        raise LmembedError(f"calibration {source}: {len(ids)} tokens, fewer than the budget of {tokens}; give a "
                           f"longer text or lower the budget (calib_tokens / --calib-tokens)")
    return ids[:tokens], source


def _text_ids(spec: str, tokenizer: Any, vocab_size: int, max_chars: int | None = None) -> torch.Tensor:
    """The token ids of a text spec (its first `max_chars` characters when given), checked."""
    if tokenizer is None:
        raise LmembedError(f"calibration text {spec}: a tokenizer is needed to read text (pass tokenizer=)")
    from ...data.texts import load_text

    text = load_text(spec, max_chars)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"],
                       dtype=torch.long)
    if len(ids) and int(ids.max()) >= vocab_size:
        raise LmembedError(f"calibration text {spec}: its tokenizer gives id {int(ids.max())} but the model has "
                           f"{vocab_size} tokens (tokenizer of another model?)")
    return ids


def mix_ids(tokenizer: Any, vocab_size: int, tokens: int) -> torch.Tensor:
    """Equal shares of the bundled corpora (MIX_TEXTS), each from its start, concatenated."""
    share = math.ceil(tokens / len(MIX_TEXTS))
    parts = [_text_ids(spec, tokenizer, vocab_size, max_chars=share * 8)[:share] for spec in MIX_TEXTS]
    ids = torch.cat(parts)[:tokens]
    if len(ids) < tokens:
        raise LmembedError(f"calibration mix: {len(ids)} tokens from {', '.join(MIX_TEXTS)}, fewer than the budget "
                           f"of {tokens}")
    return ids


def can_sample(model: torch.nn.Module) -> bool:
    """Whether the model generates left to right (a causal LM with an output layer)."""
    gen = getattr(model, "can_generate", None)
    cfg = getattr(model, "config", None)
    return (callable(gen) and bool(gen()) and not getattr(cfg, "is_encoder_decoder", False)
            and find_sites(model).output_module is not None)


def default_source(model: torch.nn.Module, tokenizer: Any) -> str:
    """The calibration a calibrated method gets when given none: DEFAULT_CALIB where the model can
    generate, else the bundled mix (which needs the tokenizer)."""
    if can_sample(model):
        return DEFAULT_CALIB
    if tokenizer is None:
        raise LmembedError(f"calibration: {type(model).__name__} cannot sample its own text and no tokenizer was "
                           "given for the bundled mix; pass calib= (a text, a file or token ids) or tokenizer=")
    return "mix"


def resolve_calibration(model: torch.nn.Module, methods: list[Any], calib: Any, *, tokenizer: Any = None,
                        tokens: int | None = None, seed: int = 0, progress: bool | None = None,
                        log: Callable[[str], None] = lambda s: None) -> CalibStats | None:
    """Statistics for the methods (Method objects or method strings / pipelines): as given, from the
    given text, or, when a calibrated method is given none, from default_source (users rarely know
    the domain of tomorrow's prompts). None when nothing needs them."""
    from ..registry import as_pipeline

    stages = [s for m in methods for s in (as_pipeline(m) if isinstance(m, str) else [m])]
    for m in stages:  # a method that cannot serve this model says so before it is calibrated
        getattr(m, "check_model", lambda model: None)(model)
    if isinstance(calib, CalibStats):
        return calib
    if calib is None:
        if not any(getattr(m, "needs_calib", False) for m in stages):
            return None
        calib = default_source(model, tokenizer)
    t0 = time.perf_counter()
    stats = calibrate(model, calib, tokenizer=tokenizer, tokens=tokens, seed=seed, progress=progress)
    log(f"calibrated on {stats.tokens} tokens of {stats.source} ({time.perf_counter() - t0:.0f} s)")
    return stats


def _budget(calib: Any, tokens: int | None) -> int:
    builtin = isinstance(calib, str) and calib in SOURCES
    tokens = (SOURCES[calib] if builtin else DEFAULT_TOKENS) if tokens is None else tokens
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
        raise LmembedError(f"calibration budget: expected a positive number of tokens, not {tokens!r}")
    return tokens


@torch.no_grad()
def calibrate(model: torch.nn.Module, calib: Any, *, tokenizer: Any = None, tokens: int | None = None,
              window: int = 512, batch: int = 1, sample: int = 4096, seed: int = 0, cache: bool = True,
              progress: bool | None = None) -> CalibStats:
    """One forward pass of the (uncompressed) model over the calibration ids, or, for the built-in
    sources (SOURCES), over the bundled mix and/or while sampling from the model; seeded, cached.
    `tokens` defaults to DEFAULT_TOKENS for a text, to the source's own budget for a built-in one."""
    sites = find_sites(model)
    v, d = sites.input_weight.shape
    tokens = _budget(calib, tokens)
    sampled = 0
    if isinstance(calib, str) and calib in SOURCES:
        sampled = {"model": tokens, "mix": 0}.get(calib, tokens // 2)
        if sampled and not can_sample(model):
            raise LmembedError(f"calibration {calib!r} samples text from the model, but {type(model).__name__} is not "
                               "a causal language model; use calib='mix' or a text")
        ids = mix_ids(tokenizer, v, tokens - sampled) if tokens > sampled else torch.zeros(0, dtype=torch.long)
        source = calib
    else:
        ids, source = calibration_ids(calib, tokenizer, v, tokens)
    key = hashlib.sha1()
    key.update(content_hash(sites.input_weight).encode())  # read in place, no copy of the matrix
    key.update(ids.numpy().tobytes())
    key.update(f"{window}:{sample}:{seed}:{CALIB_VERSION}".encode())
    if source in SOURCES:
        key.update(f"{source}:{sampled}:{SAMPLE_BATCH}:{SAMPLE_LENGTH}:1.0:{CALIB_VERSION}".encode())
    inputs = key.hexdigest()
    path = _cache_dir() / f"{inputs[:20]}.pt"
    cached = _read_cached(path, inputs, v, d) if cache else None
    if cached is not None:
        return cached
    stats = _collect(model, ids, sampled, source, window=window, batch=batch, sample=sample, seed=seed,
                     progress=progress)
    if cache:
        _write_cached(path, inputs, stats)
    return stats


def _read_cached(path: Path, inputs: str, vocab: int, dim: int) -> CalibStats | None:
    """The cache entry at `path` when it was computed from `inputs` and is as it was written
    (lmembed.common.cache); otherwise None, with one line saying why it is computed again."""
    if not path.is_file():
        return None
    try:
        entry = torch.load(path, weights_only=True)
        fields = entry["stats"]
        problem = ("it was computed from other inputs" if entry.get("inputs") != inputs else
                   "its content changed after it was written" if entry.get("content_sha256") != content_digest(fields)
                   else None)
        stats = None if problem else CalibStats(**fields)
    except Exception as e:  # noqa: BLE001 - a damaged entry (truncated, not a dict) is computed again
        problem, stats = f"it cannot be read ({type(e).__name__})", None
    problem = problem or _stats_problem(stats, vocab, dim)
    if problem:
        note(f"calibration cache {path}: {problem}; computing the statistics again")
        return None
    stats.from_cache = True  # type: ignore[union-attr]  # what the command line reports
    return stats


def _stats_problem(stats: CalibStats, vocab: int, dim: int) -> str | None:
    """Shapes that do not fit a V x d matrix, or values that are not finite."""
    want = {"in_freq": (vocab,), "out_prob": (vocab,), "hidden_moment": (dim, dim), "input_fisher": (dim, dim)}
    for name, shape in want.items():
        t = getattr(stats, name)
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != shape
                              or not bool(torch.isfinite(t).all())):
            return f"its {name} does not fit a {vocab} x {dim} matrix or is not finite"
    return None if stats.dim == dim else f"it is for dimension {stats.dim}, not {dim}"


def _write_cached(path: Path, inputs: str, stats: CalibStats) -> None:
    """Write an entry with the digests of its inputs and content; a cache that cannot be written
    (read-only, full) is one line, and the statistics are used uncached."""
    fields = stats.to_dict()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({"inputs": inputs, "content_sha256": content_digest(fields), "stats": fields}, path)
    except (OSError, RuntimeError) as e:
        note(f"calibration cache {path.parent}: cannot be written ({getattr(e, 'strerror', None) or e}); "
             "the statistics are not cached")


def _collect(model: torch.nn.Module, ids: torch.Tensor, sampled: int, source: str, *, window: int, batch: int,
             sample: int, seed: int, progress: bool | None) -> CalibStats:
    """Statistics of a forward pass over `ids` plus `sampled` tokens generated by the model."""
    sites = find_sites(model)
    v, d = sites.input_weight.shape
    head = sites.output_module
    if head is None:  # an encoder: only the input side has something to say
        return CalibStats(None, None, torch.bincount(ids, minlength=v).double(), len(ids), source, d)
    acc = _Moments(v, d)
    acc.in_freq += torch.bincount(ids, minlength=v).double()
    captured: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda mod, args: captured.append(args[0].detach()))
    was_training = model.training
    model.eval()
    bar = None if progress is None else not progress
    seqs = []
    try:
        if len(ids):
            seqs.extend(_text_pass(model, head, ids, acc, captured, window, batch, bar))
        if sampled:
            seqs.extend(_sample_pass(model, acc, captured, sampled, seed, bar))
    finally:
        hook.remove()
    try:
        fisher = input_fisher(model, seqs, seed)
    finally:
        model.train(was_training)
    return replace(acc.stats(source, sample, seed), input_fisher=fisher)


def input_fisher(model: torch.nn.Module, seqs: list[torch.Tensor], seed: int) -> torch.Tensor | None:
    """G = E[g gᵀ] over the first FISHER_TOKENS positions of `seqs`, g the gradient at the input
    embedding of the log-loss of next tokens drawn from the model itself (the Fisher information,
    so G is what an input-row error costs the loss to second order). None for a model that takes
    no input embeddings (not a transformers model)."""
    if not hasattr(model, "config") or not seqs:
        return None
    emb, device = model.get_input_embeddings(), next(model.parameters()).device
    g_sum, n = None, 0
    gen = torch.Generator().manual_seed(seed + 1)
    for seq in seqs:
        if n >= FISHER_TOKENS:
            break
        seq = seq[: FISHER_TOKENS - n].view(1, -1).to(device)
        with torch.enable_grad():
            x = emb(seq).detach().float().requires_grad_(True)
            logits = _logits_of_embeds(model, x)[0].float()
            with torch.no_grad():
                y = torch.multinomial(torch.softmax(logits, -1).cpu(), 1, generator=gen).flatten().to(device)
            (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, y, reduction="sum"), x)
        g = g[0].double().cpu()
        g_sum = g.t() @ g if g_sum is None else g_sum + g.t() @ g
        n += len(g)
    return g_sum / n if n else None


def _logits_of_embeds(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(inputs_embeds=x.to(next(model.parameters()).dtype))
    return out.logits if hasattr(out, "logits") else out[0]


def _text_pass(model: torch.nn.Module, head: torch.nn.Module, ids: torch.Tensor, acc: _Moments,
               captured: list[torch.Tensor], window: int, batch: int, disable: bool | None) -> list[torch.Tensor]:
    """Forward windows of the text, `batch` at a time; the head's inputs arrive through `captured`.
    Returns the windows (the input Fisher's sequences)."""
    from ...models.pretrained import context_length

    window = min(window, context_length(model))
    device = next(model.parameters()).device
    n_rows = max(1, len(ids) // window)
    rows = ids[: n_rows * window].view(n_rows, window)
    lean = _logits_are_the_heads(model)
    for s in tqdm(range(0, n_rows, batch), desc="calibrating", disable=disable, leave=False):
        captured.clear()
        x = rows[s : s + batch].to(device)
        if not lean:
            logits = _logits(model, x)
            acc.add(captured[-1], logits)
            continue
        with _head_deferred(head):  # the model runs without forming its (window x V) logits
            _logits(model, x)
        h = captured[-1].reshape(-1, captured[-1].shape[-1])
        for c in range(0, len(h), PROB_ROWS):  # the head runs here, a chunk of positions at a time
            acc.add(h[c : c + PROB_ROWS], head(h[c : c + PROB_ROWS]))
    return list(rows)


def _sample_pass(model: torch.nn.Module, acc: _Moments, captured: list[torch.Tensor], tokens: int, seed: int,
                 disable: bool | None) -> list[torch.Tensor]:
    """Sample whole sequences from the start token (SAMPLE_BATCH at a time, a seeded generator),
    folding in each step's hidden states and probabilities; the input counts are the expected ones.
    Returns the sampled sequences."""
    from ...models.pretrained import context_length

    length = min(SAMPLE_LENGTH, context_length(model))
    seqs = math.ceil(tokens / length)
    cfg = getattr(model, "config", None)
    start = next((t for t in (getattr(cfg, "bos_token_id", None), getattr(cfg, "eos_token_id", None))
                  if isinstance(t, int)), 0)
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    # the key/value cache argument is `cache` or `past_key_values` by the transformers version at hand
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    bar = tqdm(total=seqs * length, desc="sampling", disable=disable, leave=False)
    out_seqs: list[torch.Tensor] = []
    for s0 in range(0, seqs, SAMPLE_BATCH):
        x = torch.full((min(SAMPLE_BATCH, seqs - s0), 1), start, dtype=torch.long)
        steps, past = [x], None
        for _ in range(length):
            captured.clear()
            out, past = _step(model, x.to(device), past, cache_arg)
            p = acc.add(captured[-1][:, -1], out.logits[:, -1])  # the model's own distribution (temperature 1)
            acc.in_freq += p.double().sum(0).cpu()
            x = torch.multinomial(p.float().cpu(), 1, generator=g)
            steps.append(x)
            bar.update(len(x))
        out_seqs.extend(torch.cat(steps[:-1], 1))
    bar.close()
    return out_seqs


def _step(model: torch.nn.Module, x: torch.Tensor, past: Any, cache_arg: str) -> tuple[Any, Any]:
    """One decoding step with the key/value cache, passed as `cache_arg`."""
    out = model(input_ids=x, use_cache=True, **({cache_arg: past} if past is not None else {}))
    nxt = getattr(out, "cache", None)
    return out, nxt if nxt is not None else getattr(out, "past_key_values", None)


# config fields of architectures whose logits are more than the head's output (left to the model)
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _logits_are_the_heads(model: torch.nn.Module) -> bool:
    """Whether the model's logits are exactly its head's output (no soft-capping or scaling after
    it), so the head can be run by calibration itself, a chunk of positions at a time."""
    cfg = getattr(model, "config", None)
    return not any(getattr(cfg, k, None) not in (None, 1, 1.0) for k in LOGIT_TRANSFORMS)


@contextlib.contextmanager
def _head_deferred(head: torch.nn.Module) -> Iterator[None]:
    """Within: the head's forward returns a (..., 1) placeholder (its pre-hooks still see its
    input), so a forward pass never holds all positions' logits; restored on exit."""
    head.forward = lambda x, *a, **k: x[..., :1]
    try:
        yield
    finally:
        del head.forward


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=x) if hasattr(model, "config") else model(x)
    return out.logits if hasattr(out, "logits") else out[0]
