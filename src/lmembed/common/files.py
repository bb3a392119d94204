"""Files lmembed writes and reads: atomic writes, stable JSON, output folders."""

from __future__ import annotations

import ctypes
import fnmatch
import hashlib
import json
import math
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import LmembedError
from .faults import fault_point


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_with(path: str | Path, write: Callable[[str], None]) -> None:
    """Let `write(tmp)` fill a temp file in the same folder, then rename it over `path`: readers
    see the old file or the new one, never half of one (a crash leaves the old file intact)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    atomic_write_with(path, write)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save through a temp file + rename (a crash mid-save keeps the previous checkpoint)."""
    atomic_write_with(path, lambda tmp: torch.save(obj, tmp))


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor) and o.numel() == 1:
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _clean(o: Any) -> Any:
    """JSON has no NaN/inf: write them as null so the files stay valid for every parser."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def json_bytes(obj: Any) -> bytes:
    """Stable, diffable JSON: sorted keys, 2-space indent, trailing newline; NaN/inf as null."""
    return (json.dumps(_clean(obj), indent=2, sort_keys=True, default=_json_default) + "\n").encode()


def write_json(path: str | Path, obj: Any) -> None:
    """json_bytes(obj), written atomically."""
    atomic_write_bytes(path, json_bytes(obj))


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmembedError(f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmembedError(f"{path}: {what} is not valid JSON ({e})") from None


# --- output folders: what --force may replace ----------------------------------------------------
SAVE_MANIFEST, EXPORT_RECORD = "lmembed.json", "lmembed_export.json"
# Names lmembed wrote in saves of format 1, which had no list of files.
FORMAT1_FILES = frozenset({"config.json", "generation_config.json", "model.safetensors", SAVE_MANIFEST, "report.json",
                           "report.md", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                           "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja"})


# What an interrupted write leaves beside its output NAME: a staging folder (.NAME.lmembed-new-*),
# a temp file (.NAME.xxxxxxxx.tmp of atomic_write_with, .NAME.tmpPID of a GGUF write), and the
# old folder of a save killed mid-switch (.NAME.lmembed-old-*, which may hold the user's files).
TEMP_SUFFIX = re.compile(r"lmembed-new-[a-z0-9_]{8}|[a-z0-9_]{8}\.tmp|tmp\d+")
OLD_SUFFIX = re.compile(r"lmembed-old-[a-z0-9_]{8}")
TEMP = re.compile(rf"\..+\.(?:{TEMP_SUFFIX.pattern})")  # any output's leftovers, inside a folder


def real_path(path: str | Path) -> Path:
    """`path` with links and '..' resolved (it need not exist): two spellings of one folder, or a
    link and its target, are one output, one lock, one set of rules."""
    return Path(os.path.realpath(Path(path).expanduser()))


def _json_object(path: Path) -> dict | None:
    try:
        if not path.is_file() or path.stat().st_size > 1 << 26:
            return None
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def owned_names(folder: Path) -> set[str] | None:
    """The names lmembed wrote in `folder` by the record it keeps there (a save's manifest, an
    export's record), or None when the folder holds no such record."""
    manifest = _json_object(folder / SAVE_MANIFEST)
    if manifest is not None and isinstance(manifest.get("files"), dict):
        return {str(f) for f in manifest["files"]} | {SAVE_MANIFEST}
    if manifest is not None and manifest.get("format") == 1:
        return set(FORMAT1_FILES)
    record = _json_object(folder / EXPORT_RECORD)
    if record is not None and isinstance(record.get("files"), list):
        return {str(f) for f in record["files"] if isinstance(f, str)} | {EXPORT_RECORD}
    return None


def is_lmembed_output(folder: Path) -> bool:
    """Whether `folder` is one lmembed wrote: a save or an export (their records list the files),
    a run (its config.json is a run config, not a transformers one), a bench or fine-tune (its
    settings.json), an analysis. Only such a folder, or an empty one, may be replaced by --force."""
    if owned_names(folder) is not None or _is_run(folder):
        return True
    settings = _json_object(folder / "settings.json")
    if settings is not None and "model" in settings:
        return True
    if any(_json_object(folder / name) is not None for name in ("analysis.json", "embeddings.json", "tying.json",
                                                               "tying-seq2seq.json")):
        return True
    entries = [folder / name for name in _listing(folder)]
    return bool(entries) and all(_is_run(e) for e in entries)  # a tying bench killed before its table: runs only


def _is_run(folder: Path) -> bool:
    """A run folder: its config.json is a run config, not a transformers one."""
    config = _json_object(folder / "config.json")
    return config is not None and {"preset", "tie"} <= config.keys() and "model_type" not in config


def _listing(folder: Path) -> list[str]:
    return sorted(e.name for e in folder.iterdir() if not TEMP.fullmatch(e.name))


def _existing(given: Any) -> Path | None:
    """The file or folder an input names, if it is one on disk (a text spec may add ':split')."""
    if not isinstance(given, (str, Path)):
        return None
    for candidate in (str(given), str(given).rpartition(":")[0]):
        if candidate and Path(candidate).expanduser().exists():
            return real_path(candidate)
    return None


def check_not_input(out: str | Path, inputs: tuple[Any, ...] | list[Any]) -> None:
    """Refuse an output that is an input, or a folder holding one (replacing it would destroy what
    is being read), however either is spelled (links, '..')."""
    target = real_path(out)
    for given in inputs:
        source = _existing(given)  # a bundled name or a hub id is nothing of the user's to overwrite
        if source is not None and (source == target or target in source.parents):
            what = "is the input" if source == target else "holds the input"
            raise LmembedError(f"{out}: {what} {given}; write the output to another folder")


def check_out_dir(out: str | Path, *, force: bool, inputs: tuple[Any, ...] | list[Any] = ()) -> Path:
    """Refuse, before any work: an output that is a file, the filesystem root, an input (or holds
    one), a non-empty folder without --force, or with --force one that lmembed did not write
    (its files would be replaced). Changes nothing; returns `out` as given."""
    path = Path(out).expanduser()
    real = real_path(path)
    if real.parent == real:
        raise LmembedError(f"{out}: is the filesystem root; give a folder to write into")
    check_not_input(out, inputs)
    if real.exists() and not real.is_dir():
        raise LmembedError(f"{out}: exists and is not a directory")
    if real.is_dir() and _listing(real):
        if not force:
            raise LmembedError(f"{out}: directory is not empty; pass --force to replace what lmembed wrote there")
        refuse_foreign(real, out)
    return path


def refuse_foreign(real: Path, shown: str | Path) -> None:
    """One clear line when --force would replace a folder lmembed did not write."""
    if not is_lmembed_output(real):
        sample = ", ".join(_listing(real)[:3])
        raise LmembedError(f"{shown}: holds files lmembed did not write ({sample}...); --force replaces only an "
                           "lmembed output, so choose a new or empty folder")


def prepare_out_dir(out: str | Path, *, force: bool, owned: tuple[str, ...], resume: bool = False,
                    marker: str = "config.json") -> Path:
    """Make OUT ready for a command that writes the entries `owned` (names or glob patterns).

    Call it once every input is checked: a non-empty folder needs --force (or --resume), and
    --force removes only lmembed's own entries there, never a user's other files."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LmembedError(f"{out}: exists and is not a directory")
    if out.exists() and _listing(out):
        if resume:
            return out
        if not force:
            raise LmembedError(f"{out}: directory is not empty; pass --force to replace what lmembed wrote there, "
                               "or --resume to continue")
        remove_owned(out, owned)
    elif resume:
        raise LmembedError(f"{out}: nothing to resume ({marker} not found)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def bench_dir(out: str | Path, *, force: bool, owned: tuple[str, ...]) -> Path:
    """A bench's folder: reused as it is (finished rows are kept and the bench resumes) unless
    --force, which removes only the bench's own entries. A folder lmembed did not write is
    refused either way (the bench would write over its files). Call it once the inputs are checked."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LmembedError(f"{out}: exists and is not a directory")
    if out.is_dir() and _listing(out):
        refuse_foreign(real_path(out), out)
        if force:
            remove_owned(out, owned)
    out.mkdir(parents=True, exist_ok=True)
    return out


def remove_owned(out: Path, owned: tuple[str, ...]) -> list[str]:
    """Delete the entries of `out` that match `owned` (lmembed's own names and patterns, and
    its temp files); returns what was removed. A folder lmembed did not write is refused
    before anything is deleted (its config.json is the user's, whatever the name says)."""
    doomed = [e for e in sorted(out.iterdir()) if any(fnmatch.fnmatchcase(e.name, pat) for pat in owned)]
    if doomed:
        refuse_foreign(real_path(out), out)
    gone = []
    for entry in sorted(out.iterdir()):
        if entry in doomed or TEMP.fullmatch(entry.name):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            gone.append(entry.name)
    return gone


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def publish_dir(tmp: Path, out: Path, owned: set[str]) -> None:
    """Make the complete folder `tmp` the folder `out`. An existing `out` is swapped out in one
    atomic step where the OS allows (else two renames, microseconds apart), so a reader sees the
    old complete result or the new one; then the entries of the old folder that lmembed did not
    write (`owned`: the names lmembed writes there) move into the new one. A user's own files are
    never deleted: after a crash in between, they are in the `.NAME.lmembed-old-*` sibling (and
    the next command on `out` moves them back, clean_leftovers). The new folder and its files
    get the old folder's mode, or the umask's."""
    _set_modes(tmp, stat.S_IMODE(out.stat().st_mode) if out.is_dir() else 0o777 & ~current_umask())
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.lmembed-old-", dir=out.parent))
    if _exchange(tmp, out):
        os.rmdir(old)
        os.replace(tmp, old)  # tmp now names the old folder
    else:
        os.rmdir(old)
        os.replace(out, old)
        os.replace(tmp, out)
    fault_point("save:switched")
    _move_back(old, out, owned)


def _move_back(old: Path, out: Path, owned: set[str]) -> None:
    """The entries of `old` that lmembed did not write move into `out` (where free); then `old` goes."""
    for entry in sorted(old.iterdir()):
        if entry.name not in owned and not TEMP.fullmatch(entry.name) and not (out / entry.name).exists():
            os.replace(entry, out / entry.name)
    shutil.rmtree(old, ignore_errors=True)


def _set_modes(folder: Path, mode: int) -> None:
    """`folder` gets `mode`, its files the umask's (mkdtemp and safetensors make 0700 and 0600)."""
    os.chmod(folder, mode)
    file_mode = 0o666 & ~current_umask()
    for entry in folder.iterdir():
        if entry.is_file() and not entry.is_symlink():
            os.chmod(entry, file_mode)


def staging_dir(out: Path) -> Path:
    """An empty sibling folder of `out` (same filesystem) to build a new result in."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.lmembed-new-", dir=out.parent))


def build_and_publish(out: Path, owned: set[str], build: Callable[[Path], None], what: str) -> None:
    """Build the new output in a staging folder (`build(tmp)`) and switch it in whole (publish_dir).
    Whatever stops the build (an error, Ctrl-C, SIGTERM, a full disk) removes the staging folder
    and leaves the old output as it was; a full disk or a refused write is one line naming `out`."""
    with terminate_as_interrupt():
        tmp = staging_dir(out)
        try:
            try:
                build(tmp)
            except Exception as e:  # noqa: BLE001 - only an OS error (as any library reports it) is caught
                code = os_error_code(e)
                if code is None:
                    raise
                raise LmembedError(f"{out}: cannot write the {what} ({os.strerror(code)}); the old output is "
                                   "unchanged") from None
            fault_point("save:staged")
            publish_dir(tmp, out, owned | {f.name for f in tmp.iterdir()})
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def os_error_code(e: BaseException) -> int | None:
    """The errno behind an exception: an OSError's own, or the "(os error N)" that libraries such
    as safetensors put in their messages (a full disk while they write); None for anything else."""
    if isinstance(e, OSError) and e.errno:
        return e.errno
    found = re.search(r"os error (\d+)", str(e))
    return int(found.group(1)) if found else None


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so temp files and staging folders are removed on the
    way out (a kill -9 leaves them, and the next command on that output removes them)."""


@contextmanager
def terminate_as_interrupt(*, die: bool = True) -> Iterator[None]:
    """Within the block SIGTERM raises Terminated (in the main thread, where the program has set
    no handler of its own). `die`: once the cleanup it triggers is done, the process still ends
    as SIGTERM ends it; the command line instead reports it (exit code 143)."""
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or previous not in (signal.SIG_DFL, None):
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise Terminated()

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    except Terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if die:
            os.kill(os.getpid(), signal.SIGTERM)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def clean_leftovers(out: str | Path) -> list[str]:
    """Remove what killed writers of `out` left beside it, and move back the user's files that a
    save killed mid-switch left in the old folder. Only for a caller holding the lock of `out`:
    no other writer of it can be alive. Returns the names it dealt with."""
    out = real_path(out)
    try:
        entries = [e for e in out.parent.iterdir() if e.name.startswith(f".{out.name}.")]
    except OSError:
        return []
    done = []
    for entry in sorted(entries):
        rest = entry.name[len(out.name) + 2:]
        try:
            if TEMP_SUFFIX.fullmatch(rest):
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            elif OLD_SUFFIX.fullmatch(rest) and entry.is_dir():
                _recover(entry, out)
            else:
                continue
        except OSError:
            continue  # not ours to remove after all (permissions): left as it is
        done.append(entry.name)
    return done


def _recover(old: Path, out: Path) -> None:
    """A save killed mid-switch: with no `out`, the old folder is the output again; else the
    entries its own record does not list (the user's) move into `out`."""
    if not out.exists():
        os.replace(old, out)
        return
    _move_back(old, out, owned_names(old) or set())
