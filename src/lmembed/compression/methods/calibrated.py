"""Calibration-aware methods: the error that matters is the model's, not the matrix's.

For a row error ΔE_v the cost is w_v · ΔE_v M ΔE_vᵀ, with a row weight w_v and a d x d column
metric M from the calibration statistics (calibration/sensitivity.py): H = E[h hᵀ] for the output
role, the input Fisher G for the input role, H + a·G for a tied matrix. ``wsvd`` minimises it in
closed form among rank-k matrices (whitening by a Cholesky factor of M), ``gptq-intB`` rounds each
row column by column and pushes the rounding error onto the columns not yet rounded, weighted by M
(GPTQ applied to the rows of an embedding matrix), and ``wae`` trains the autoencoder under it.
"""

from __future__ import annotations

import math

import torch

from ...errors import LmembedError
from ..calibration.sensitivity import INPUT_WEIGHT, metric_for, need_calib, whitening_for
from ..formats.base import CompressedEmbedding
from ..formats.bits import from_codes, pack_bits, to_codes
from ..formats.dense import FactorizedEmbedding
from ..formats.quantized import QuantizedEmbedding
from ..formats.rowrank import RANK_BYTES, RowRankEmbedding
from ..registry import Arg, FitContext, Method, bool_flag, choice, fraction, non_negative_float, positive_int, register
from .allocation import allocate
from .autoencoder import AutoEncoder, init_name
from .gptq import gptq_columns
from .quantize import CLIP, FIT_ROWS, GRID, GROUP, check_group, group_scales, width_variant
from .svd import GRAM_ROWS, check_rank, gram_matrix, top_right_singular_vectors

# Arguments every calibrated method shares.
MIX = Arg("mix", fraction, 1.0, "tied matrices: weight of the output role (1 - mix: input role)")


DAMP = Arg("damp", non_negative_float, 0.01, "added to the metric's diagonal, relative to its mean")


FLOOR = Arg("floor", non_negative_float, 0.1, "row weights: floor as a fraction of the mean")


INPUT = Arg("input", non_negative_float, INPUT_WEIGHT, "tied matrices: weight of the input role's Fisher G beside "
            "the output role's H")


# wsvd:432 on SmolLM2 (wiki:test, both sides, default calibration): metric H / H + G, floor 0.1:
# +64.5 / +61 %; H + G with floor 0.3 / 1 / 2: +53.2 / +47.2 / +47.8 %; at floor 1, damp 0.1 /
# 0.01 / 0.001: +63.7 / +47.2 / +46.0 %. Rare rows need more weight than their calibration
# probability says (even calibrated on wiki:train, floor 1 beats 0.1: +37.9 against +46.0 %).
LOW_RANK = (INPUT, Arg("damp", non_negative_float, 0.001, "added to the metric's diagonal, relative to its mean"),
            Arg("floor", non_negative_float, 1.0, "row weights: floor as a fraction of the mean"))


ALLOC = Arg("alloc", choice("uniform", "rows"), "uniform",
            "rows: a rank per row (calibrated Lagrangian), no more stored bytes than rank RANK")


ROW_RANK_CHOICES = 64  # per-row ranks are multiples of d // 64 (SmolLM2: 9; steps of 1 and 8 measured alike)


@register
class WeightedSVD(Method):
    needs_calib = True
    name = "wsvd"
    summary = "calibrated low-rank: SVD after whitening by the model's sensitivity H + a·G (needs calib)"
    positional = (Arg("rank", positive_int, required=True),)
    options = (*LOW_RANK, ALLOC)

    def makes(self, given: str) -> str:
        return "tunable" if self.alloc == "rows" else "factors"  # per-row ranks cannot be requantised

    def check(self, num_embeddings: int, dim: int) -> None:
        check_rank(self, self.rank, dim)

    def fit(self, weight: torch.Tensor, ctx: FitContext) -> CompressedEmbedding:
        self.check(*weight.shape)
        calib = need_calib(self, ctx)
        w = weight.detach().cpu()
        m = whitening_for(self, ctx, w.shape[1])
        chol = torch.linalg.cholesky(m)  # M = L Lᵀ: ||ΔE L||² is the weighted error
        r = calib.row_weights(ctx.side, mix=1.0, floor=self.floor).double().sqrt()
        if len(r) != w.shape[0]:
            raise LmembedError(f"method {self.text!r}: calibration has {len(r)} tokens, the matrix {w.shape[0]} rows")
        # the right singular vectors of X = diag(r) W L, from its Gram matrix (X is never built)
        keep = self.rank if self.alloc == "uniform" else w.shape[1]
        vk = top_right_singular_vectors(w, keep, gram=gram_matrix(w, chol, r)).double()
        proj = chol @ vk  # codes = W L Vk: the row weights cancel in the reconstruction
        decoder = torch.linalg.solve_triangular(chol.t(), vk, upper=True).t()  # Vkᵀ L⁻¹
        if self.alloc == "rows":
            return self._row_ranks(w, proj, decoder, r.pow(2))
        codes = torch.cat([(c.double() @ proj).float() for c in w.split(GRAM_ROWS)])
        return FactorizedEmbedding(codes, decoder.float())

    def _row_ranks(self, w: torch.Tensor, proj: torch.Tensor, decoder: torch.Tensor,
                   weights: torch.Tensor) -> RowRankEmbedding:
        """Codes in the whitened basis (ordered by what each direction removes), so a row's error at
        rank k is its weighted tail energy past k; one Lagrangian then spends the bytes of rank
        RANK, trying three decoder sizes (a larger one leaves fewer codes to the rows)."""
        v, d = w.shape
        ranks = torch.cat([torch.arange(0, d, max(1, d // ROW_RANK_CHOICES)), torch.tensor([d])]).unique()
        errors = []
        for s, c in zip(range(0, v, GRAM_ROWS), w.split(GRAM_ROWS), strict=True):
            tail = (c.double() @ proj).pow(2).flip(1).cumsum(1).flip(1)
            tail = torch.cat([tail, tail.new_zeros(len(c), 1)], 1)
            errors.append((tail[:, ranks] * weights[s:s + len(c), None]).float())
        errors = torch.cat(errors)
        bytes_left = 4 * (v * self.rank + self.rank * d) - v * RANK_BYTES  # rank RANK's bytes, less the rank map
        best = None
        for kmax in sorted({min(d, self.rank), (self.rank + d) // 2, d}):
            allowed = int((ranks <= kmax).sum())
            budget = bytes_left // 4 - kmax * d
            if budget < 0:
                continue
            pick = allocate(errors[:, :allowed], ranks[:allowed].double(), budget)
            cost = float(errors.gather(1, pick[:, None]).sum())
            if best is None or cost < best[0]:
                best = (cost, ranks[pick], kmax)
        if best is None:
            raise LmembedError(f"method {self.text!r}: rank {self.rank} of a {v} x {d} matrix leaves no bytes "
                               "for per-row ranks (use alloc=uniform)")
        _, row_rank, kmax = best
        codes = []
        for k in row_rank.unique().tolist():
            rows = (row_rank == k).nonzero().flatten()
            if k:
                codes.append((w[rows].double() @ proj[:, :k]).float().flatten())
        codes = torch.cat(codes) if codes else torch.zeros(0)
        return RowRankEmbedding(codes, row_rank, decoder[:kmax].float())


def gptq_rows(weight: torch.Tensor, metric: torch.Tensor, bits: int, group: int, block: int = 128,
              grid: str = "int", clip: bool = False) -> QuantizedEmbedding:
    """GPTQ rounding of every row of a V x d matrix against the column metric (d x d, damped).
    Rows are independent given the metric: they are rounded a chunk at a time."""
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(metric))
    u = torch.linalg.cholesky(hinv, upper=True).float()
    parts = [_gptq_chunk(c, u, bits, group, max(group, block // group * group), grid, clip)
             for c in weight.detach().split(FIT_ROWS)]
    return QuantizedEmbedding(torch.cat([p for p, _ in parts]), torch.cat([s for _, s in parts]), bits=bits,
                              group_size=group, embedding_dim=weight.shape[1], grid=grid)


def _gptq_chunk(chunk: torch.Tensor, u: torch.Tensor, bits: int, group: int, block: int, grid: str,
                clip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed codes, fp16 scales) of some rows; blocks of columns never split a group."""
    v, d = chunk.shape
    scales = torch.zeros(v, math.ceil(d / group), dtype=torch.float16)
    q = torch.zeros(v, d, dtype=torch.int32)
    scale: list[torch.Tensor] = []  # the current group's scale, set at its first column

    def round_column(col: int, w1: torch.Tensor, j: int) -> torch.Tensor:
        if col % group == 0:  # blocks never split a group, so the group's columns are all in w1
            g = col // group
            scales[:, g] = group_scales(w1[:, j : min(j + group, w1.shape[1])], bits, grid, clip)
            scale[:] = [scales[:, g].float().clamp_min(torch.finfo(torch.float16).tiny)]
        code = to_codes(w1[:, j] / scale[0], bits, grid)
        q[:, col] = code
        return from_codes(code, bits, grid) * scale[0]

    gptq_columns(chunk.float().cpu().clone(), u, block, round_column)
    return pack_bits(q, bits), scales


class GPTQ(Method):
    needs_calib = True
    superseded_by = ("tc (PyTorch, same kernels) and calibrated GGUF rounding (llama.cpp): both minimise the H + G "
                     "sensitivity this older metric approximates")
    bits = 4
    gguf_form = "codes"
    positional = (GROUP,)
    options = (MIX, DAMP, GRID, CLIP)

    def makes(self, given: str) -> str:
        return "tunable"

    def check(self, num_embeddings: int, dim: int) -> None:
        check_group(self, self.group, dim)

    def fit(self, weight: torch.Tensor, ctx: FitContext) -> CompressedEmbedding:
        self.check(*weight.shape)
        m = metric_for(self, ctx, weight.shape[1])
        return gptq_rows(weight, m, self.bits, self.group or weight.shape[1], grid=self.grid, clip=self.clip)


GPTQInt8, GPTQInt4, GPTQInt3, GPTQInt2 = (
    width_variant(GPTQ, f"GPTQInt{b}", f"gptq-int{b}", b, f"{b}-bit codes rounded GPTQ-style against the "
                  "calibration metric (needs calib)") for b in (8, 4, 3, 2))


@register
class WeightedAutoEncoder(AutoEncoder):
    """The direction-aware autoencoder trained where the calibrated error is measured: on the
    rows whitened by the metric (X = E L, M = L Lᵀ), each row's loss weighted by its importance,
    started from the weighted SVD; the decoder is mapped back (Ê = X̂ L⁻¹)."""

    needs_calib = True
    name = "wae"
    superseded_by = "wsvd: lower perplexity cost at every rank measured, in seconds instead of epochs"
    summary = "calibrated direction-aware autoencoder: ae in the whitened space, rows weighted (needs calib)"
    options = (*(a for a in AutoEncoder.options if a.name not in ("init", "epochs", "refit")),
               Arg("init", init_name, "svd", "svd (the weighted SVD solution) or random"),
               Arg("epochs", positive_int, 10),
               Arg("refit", bool_flag, True, "refit decoder and bias by weighted least squares on the codes"),
               *LOW_RANK)

    def fit(self, weight: torch.Tensor, ctx: FitContext) -> CompressedEmbedding:
        self.check(*weight.shape)
        calib = need_calib(self, ctx)
        w = weight.detach().double().cpu()
        chol = torch.linalg.cholesky(whitening_for(self, ctx, w.shape[1]))
        rw = calib.row_weights(ctx.side, mix=1.0, floor=self.floor)
        codes, dec_w, dec_b = self.train((w @ chol).float(), ctx, row_weight=rw)
        back = torch.linalg.inv(chol).float()  # X̂ L⁻¹: decoder and bias back to the embedding space
        return FactorizedEmbedding(codes, (dec_w.t() @ back).contiguous(), dec_b @ back)
