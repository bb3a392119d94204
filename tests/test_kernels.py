"""The C kernels against the PyTorch path and the dense matrix, for every packed kind, on odd shapes;
and the kernel cache: a library lmembed did not build (replaced, truncated, without its symbols) is
never executed."""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from lmembed.compression.formats import kernels
from lmembed.compression.formats.bits import pack_bits
from lmembed.compression.formats.kernels import cache, source
from lmembed.compression.formats.mixed import MixedQuantizedEmbedding, MixedSuperBlockEmbedding
from lmembed.compression.formats.rowrank import RowRankEmbedding
from lmembed.compression.formats.transform import MAP_BITS, WIDTHS, TransformCodedEmbedding, band_sizes
from lmembed.compression.methods.quantize import quantize_rows
from lmembed.compression.methods.superblock import quantize_superblock

V, D = 203, 40  # V not a multiple of the kernels' 64-row blocks, D not a multiple of 32


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _classes(v: int, n: int, seed: int) -> torch.Tensor:
    """Row classes 0..n-1, every class present."""
    cls = torch.randint(0, n, (v,), generator=_gen(seed))
    cls[:n] = torch.arange(n)
    return cls


def _quantized(bits: int, group: int, grid: str = "int", d: int = D):
    return quantize_rows(torch.randn(V, d, generator=_gen(bits)), bits, group, grid)


def _superblock(bits: int, group: int, d: int = D):
    return quantize_superblock(torch.randn(V, d, generator=_gen(bits + 50)), bits, group, search=3, iters=1, refit=1)


def _mixed():
    w, cls = torch.randn(V, D, generator=_gen(1)), _classes(V, 3, 1)
    parts = [quantize_rows(w[cls == c], b, 8, "half") for c, b in enumerate((2, 4, 8))]
    return MixedQuantizedEmbedding(parts, cls)


def _kmixed(widths=(2, 3, 5)):
    w, cls = torch.randn(V, D, generator=_gen(2)), _classes(V, len(widths), 2)
    parts = [quantize_superblock(w[cls == c], b, 16, search=3, iters=1, refit=1) for c, b in enumerate(widths)]
    return MixedSuperBlockEmbedding(parts, cls)


def _tc(d: int = D):
    """Random codes at every width, 0-bit (row, band)s included, and a random int8 decoder."""
    sizes = band_sizes(d)
    cls = [_classes(V, len(WIDTHS), 10 + j) for j in range(len(sizes))]
    counts = [torch.bincount(c, minlength=len(WIDTHS)).tolist() for c in cls]
    module = TransformCodedEmbedding(V, d, sizes, counts)
    g = _gen(3)
    state = {"decoder": torch.randint(-127, 128, (d, d), generator=g, dtype=torch.int8),
             "decoder_scales": (torch.rand(d, generator=g) * 0.02 + 0.001).half()}
    for j, size in enumerate(sizes):
        state[f"map{j}"] = pack_bits(cls[j].to(torch.int32).view(1, -1), MAP_BITS)
        for c, b in enumerate(WIDTHS):
            if b and counts[j][c]:
                state[f"codes{j}_{b}"] = torch.randint(0, 256, (counts[j][c], math.ceil(size * b / 8)), generator=g,
                                                       dtype=torch.uint8)
                state[f"scales{j}_{b}"] = torch.randint(90, 170, (counts[j][c],), generator=g, dtype=torch.uint8)
    module.load_state_dict(state)
    return module


def _rowrank():
    ranks = torch.randint(0, 7, (V,), generator=_gen(4))
    ranks[:3] = torch.tensor([0, 6, 0])  # rows of rank 0 and of the full rank
    codes = torch.randn(int(ranks.sum()), generator=_gen(5))
    return RowRankEmbedding(codes, ranks, torch.randn(6, D, generator=_gen(6)))


MODULES = {
    "int4:g32": lambda: _quantized(4, 32, d=64),  # whole 32s: dot products on the packed nibbles
    "int4:g8:half": lambda: _quantized(4, 8, "half"),
    "int3:g16": lambda: _quantized(3, 16),
    "int8:g40": lambda: _quantized(8, 40),
    "kq4:g32": lambda: _superblock(4, 32, d=64),
    "kq4:g16": lambda: _superblock(4, 16),
    "kq3:g16": lambda: _superblock(3, 16),
    "kq6:g32": lambda: _superblock(6, 32),  # the last group is 8 columns
    "kq8:g8": lambda: _superblock(8, 8),
    "mixed": _mixed,
    "kmixed": _kmixed,
    "kmixed:2-3-4-5-6": lambda: _kmixed((2, 3, 4, 5, 6)),
    "tc": _tc,
    "tc:d=37": lambda: _tc(37),
    "rowrank": _rowrank,
}


def _need_kernel():
    if kernels.library() is None:
        pytest.skip("no C compiler: the kernel is optional")


@pytest.mark.parametrize("name", MODULES)
def test_kernel_and_pytorch_paths_agree_with_the_dense_matrix(name, monkeypatch):
    _need_kernel()
    module = MODULES[name]()
    d = module.embedding_dim
    ids = torch.tensor([0, V - 1, 5, 5, 64, 63, 128, 2])
    hs = {m: torch.randn(m, d, generator=_gen(m)) for m in (1, 2, 9)}
    with torch.no_grad():
        dense = module.dense()
        fast = {m: module.logits(h) for m, h in hs.items()}
        looked = module(ids)
        with monkeypatch.context() as mp:
            mp.setattr(kernels, "_tried", True)
            mp.setattr(kernels, "_library", None)
            torch_dense = module.dense()
            slow = {m: module.logits(h) for m, h in hs.items()}
            torch_looked = module(ids)
    scale = dense.abs().max().item() * 8
    if name.startswith("tc"):  # rotated back in C (few rows) or by BLAS (many): summation order only
        assert (dense - torch_dense).abs().max() <= 1e-6 * scale and (looked - dense[ids]).abs().max() <= 1e-6 * scale
    else:  # the rows themselves: bit for bit
        assert torch.equal(dense, torch_dense) and torch.equal(looked, dense[ids])
    assert torch.equal(torch_looked, torch_dense[ids])
    for m, h in hs.items():
        assert fast[m].shape == (m, V)
        torch.testing.assert_close(fast[m], h @ dense.t(), rtol=1e-5, atol=1e-5 * scale)
        torch.testing.assert_close(slow[m], h @ dense.t(), rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("make", [_kmixed, _tc, _rowrank], ids=["kmixed", "tc", "rowrank"])
def test_many_rows_cross_the_kernels_chunks_and_threads(make, monkeypatch):
    """2,500 rows: several 1,024-row chunks of the decoding kernel (shared by two threads), a partial
    2,048-row decode buffer, and a range that starts and ends inside blocks."""
    _need_kernel()
    monkeypatch.setitem(globals(), "V", 2500)
    module = make()
    torch.set_num_threads(2)
    with torch.no_grad():
        dense = module.dense()
        h = torch.randn(1, module.embedding_dim, generator=_gen(8))
        scale = dense.abs().max().item() * 8
        torch.testing.assert_close(module.logits(h), h @ dense.t(), rtol=1e-5, atol=1e-5 * scale)
        if not isinstance(module, RowRankEmbedding):  # (tc: rotated back by BLAS, shapes differ)
            part = module.from_row_space(kernels.rows(module._layout(), 70, 2100))
            torch.testing.assert_close(part, dense[70:2170], rtol=0, atol=1e-6 * scale)


@pytest.mark.parametrize("name", ["kq4:g32", "kmixed", "tc", "rowrank", "mixed"])
def test_batched_hidden_states_and_bf16_keep_their_shape_and_dtype(name):
    _need_kernel()
    module = MODULES[name]()
    h = torch.randn(2, 3, module.embedding_dim, generator=_gen(7))
    with torch.no_grad():
        out, out16 = module.logits(h), module.logits(h.bfloat16())
        dense = module.dense()
    want = h.reshape(-1, module.embedding_dim) @ dense.t()
    assert out.shape == (2, 3, V) and out16.dtype == torch.bfloat16
    torch.testing.assert_close(out.reshape(-1, V), want, rtol=1e-5, atol=1e-5 * dense.abs().max().item() * 8)


@pytest.mark.parametrize("name", ["int4:g8:half", "kq3:g16", "tc", "kmixed", "rowrank"])
def test_gradients_take_the_pytorch_path(name):
    module = MODULES[name]()
    h = torch.randn(2, module.embedding_dim, requires_grad=True)
    module.logits(h).sum().backward()
    assert h.grad is not None and h.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["int8:g40", "kmixed", "tc", "rowrank"])
def test_out_of_range_ids_are_refused(name):
    module = MODULES[name]()
    for bad in (V, -1):
        with torch.no_grad(), pytest.raises(IndexError):
            module(torch.tensor([1, bad]))


@pytest.mark.parametrize("name, per_row", [("int4:g32", 0), ("kq4:g32", 0), ("kmixed", 0.5), ("mixed", 0.5),
                                           ("tc", 0.5 * 4), ("rowrank", 4)])
def test_no_decoded_copy_is_kept(name, per_row):
    """After lookups and logits, a module keeps at most a few bytes per row beside its stored tensors
    (class-count tables: 4 bytes per class per 64 rows, per column range; rowrank: a row's place)."""
    module = MODULES[name]()
    with torch.no_grad():
        module.logits(torch.randn(1, module.embedding_dim))
        module(torch.arange(V))
    blocks = math.ceil(V / 64) * 64
    assert module.derived_bytes() <= per_row * blocks + 8 * (module.embedding_dim + 1)
    assert (module.derived_bytes() > 0) == (per_row > 0)  # the count sees the tables there are


def test_a_map_naming_a_missing_class_is_refused():
    from lmembed.errors import LmembedError

    module = _kmixed()
    state = dict(module.state_dict())
    state["row_map"] = pack_bits(torch.full((1, V), 3, dtype=torch.int32), 2)  # 3 classes, 2-bit entries
    with pytest.raises(LmembedError, match="row-class map disagrees"):
        module.load_state_dict(state)


@pytest.mark.parametrize("name", ["mixed", "tc", "rowrank"])
def test_tables_are_checked_again_after_an_edit_in_place(name):
    """The C code trusts the derived tables: a stored map or rank edited in place is seen before the
    next call (an edit that breaks the row counts is refused, never read past the codes)."""
    from lmembed.errors import LmembedError

    _need_kernel()
    module = MODULES[name]()
    h = torch.randn(1, module.embedding_dim)
    with torch.no_grad():
        module.logits(h)
        if name == "mixed":
            module.row_class[0] = (module.row_class[0] + 1) % 3
        elif name == "tc":
            module.map0[0, 0] ^= 1  # row 0's width in band 0 changes, its codes do not follow
        else:
            module.ranks[0] += 1
        with pytest.raises(LmembedError, match="disagrees|do not add up"):
            module.logits(h)


# --- the kernel cache -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A cache holding one library lmembed built (compiled once for these tests)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler")
    root = tmp_path_factory.mktemp("kernel-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMEMBED_CACHE", str(root))
        cache.load(compiler)
    return root


@pytest.fixture
def fresh(built, tmp_path, monkeypatch) -> Path:
    """A copy of the built cache as LMEMBED_CACHE, and the library path in it; kernels.library() forgets
    what it loaded (restored after the test)."""
    shutil.copytree(built, tmp_path / "cache")
    monkeypatch.setenv("LMEMBED_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", shutil.which("cc") or shutil.which("gcc"))
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_library", None)
    return cache.library_path(shutil.which("cc") or shutil.which("gcc"))


def _load_notes(capfd) -> tuple[object, list[str]]:
    """kernels.library() and the lines it wrote on stderr."""
    capfd.readouterr()
    lib = kernels.library()
    return lib, capfd.readouterr().err.splitlines()


def _works(lib) -> bool:
    q = _quantized(4, 8)
    h = torch.randn(1, D)
    return lib is not None and torch.allclose(q.logits(h), h @ q.lookup_torch(torch.arange(V)).t(), atol=1e-4)


def test_a_verified_library_loads_without_a_word(fresh, capfd):
    record = cache.digest_path(fresh).read_text()
    lib, said = _load_notes(capfd)
    assert said == [] and _works(lib)
    assert cache.digest_path(fresh).read_text() == record  # nothing rebuilt


def test_a_replaced_library_is_rebuilt_never_run(fresh, tmp_path, capfd):
    marker = tmp_path / "ran"
    src = tmp_path / "evil.c"
    src.write_text(f'#include <stdio.h>\n__attribute__((constructor)) static void run(void) {{ '
                   f'FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}\nint lm_logits(void) {{ return 0; }}\n')
    subprocess.run([shutil.which("cc") or shutil.which("gcc"), "-shared", "-fPIC", str(src), "-o", str(fresh)],
                   check=True, capture_output=True)
    lib, said = _load_notes(capfd)
    assert not marker.exists()  # the replacement was never handed to the loader
    assert len(said) == 1 and "not the one lmembed built" in said[0]
    assert _works(lib)
    assert cache.digest_path(fresh).read_text() == cache._record(fresh.read_bytes())  # rebuilt in place


def test_a_truncated_library_is_rebuilt_and_a_cache_truncated_in_use_does_no_harm(fresh, capfd):
    record = cache.digest_path(fresh).read_text()
    fresh.write_bytes(fresh.read_bytes()[:4096])
    lib, said = _load_notes(capfd)
    assert len(said) == 1 and "rebuilding" in said[0] and _works(lib)
    assert cache.digest_path(fresh).read_text() == record  # the build is repeatable: the same bytes again
    fresh.write_bytes(b"")  # truncated under a running process: what it loaded is its own copy
    assert _works(lib)


def test_a_library_without_its_digest_is_rebuilt(fresh, capfd):
    cache.digest_path(fresh).unlink()
    lib, said = _load_notes(capfd)
    assert len(said) == 1 and "no recorded digest" in said[0] and _works(lib)
    assert cache.digest_path(fresh).exists()


def test_a_library_without_the_expected_symbols_is_one_line(fresh, monkeypatch, capfd):
    monkeypatch.setitem(source.SYMBOLS, "lm_missing", [])
    monkeypatch.setattr(cache, "SYMBOLS", source.SYMBOLS)
    lib, said = _load_notes(capfd)
    assert lib is None and len(said) == 1 and "lacks lm_missing" in said[0]
    q = _quantized(4, 8)
    assert q.logits(torch.randn(1, D)).shape == (1, V)  # the PyTorch path serves


def test_disabled_kernels_are_never_built(tmp_path, monkeypatch):
    monkeypatch.setenv("LMEMBED_CACHE", str(tmp_path))
    monkeypatch.setenv("LMEMBED_KERNELS", "0")
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_library", None)
    assert kernels.library() is None and not (tmp_path / "kernels").exists()
