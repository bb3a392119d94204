"""A run directory's life: started fresh or resumed, checkpointed, found finished.

The file names and the readers of a finished run live with the models (lmembed.models.store),
because evaluation and compression read runs too; what is here only training needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..common.files import atomic_torch_save, prepare_out_dir, read_json, remove_owned
from ..errors import LmembedError
from ..models.store import CHECKPOINT, CONFIG, METRICS, RUN_FILES
from . import dist


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    atomic_torch_save(state, path)


def check_resume(cfg: Any, out: Path, resumable: set[str]) -> None:
    """--resume must continue the same run: only fields in `resumable` may differ."""
    saved = type(cfg).from_dict(read_json(out / CONFIG, "run config"), str(out / CONFIG))
    diffs = [f"{k} ({v!r} in the run, {getattr(cfg, k)!r} now)" for k, v in saved.to_dict().items()
             if k not in resumable and getattr(cfg, k) != v]
    if diffs:
        raise LmembedError(f"{out / CONFIG}: --resume with a different configuration: {'; '.join(diffs)}")


def start_run(cfg: Any, out: Path, *, resume: bool, force: bool, resumable: set[str],
              env: dist.DistEnv | None = None) -> bool:
    """True when continuing a checkpointed run; otherwise OUT is made ready (empty, or --force,
    which removes only a run's own files). Call it once the inputs are checked.

    --resume of a run killed before its first checkpoint starts it again (same config), instead
    of refusing the folder it left."""
    env = env or dist.DistEnv()
    if resume and (out / CONFIG).exists():
        check_resume(cfg, out, resumable)
        if (out / CHECKPOINT).exists():
            return True
        dist.on_main(lambda: remove_owned(out, RUN_FILES) and None, env)
    dist.on_main(lambda: prepare_out_dir(out, force=force, owned=RUN_FILES), env)
    return False


def finished_metrics(run: Path, cfg: Any) -> dict[str, Any] | None:
    """Metrics of a finished run with exactly this config (LM or seq2seq); None when it must
    start or resume. A different config in `run` is an error: a bench never mixes settings."""
    if not (run / CONFIG).exists():
        return None
    saved = type(cfg).from_dict(read_json(run / CONFIG, "run config"), str(run / CONFIG))
    if saved != cfg:
        raise LmembedError(f"{run}: holds a run with a different configuration; pass --force to retrain")
    m = read_json(run / METRICS, "run metrics") if (run / METRICS).exists() else {}
    return m if m.get("finished") else None
