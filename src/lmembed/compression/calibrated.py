"""Calibration-aware methods: the error that matters is the model's, not the matrix's.

For a row error ΔE_v the cost is taken as w_v · ΔE_v M ΔE_vᵀ, with a row weight w_v and a d x d
column metric M from the calibration statistics (lmembed.compress.calibrate):

- output role: w = mean predicted probability, M = H = E[h hᵀ] of the hidden states;
- input role: w = token frequency, M = I;
- tied matrix (both roles): a `mix` of the two.

`wsvd` minimises it in closed form among rank-k matrices (whitening by a Cholesky factor of M),
`gptq-intB` rounds each row column by column and pushes the rounding error onto the columns not
yet rounded, weighted by M (the GPTQ algorithm, applied to the rows of an embedding matrix).
"""

from __future__ import annotations

import math

import torch

from ..errors import LmembedError
from .autoencoder import AutoEncoder, init_name
from .modules import (
    FIT_ROWS,
    CompressedEmbedding,
    FactorizedEmbedding,
    QuantizedEmbedding,
    from_codes,
    group_scales,
    pack_bits,
    to_codes,
)
from .quantize import CLIP, GRID, GROUP, check_group, width_variant
from .registry import (
    Arg,
    FitContext,
    Method,
    bool_flag,
    fraction,
    non_negative_float,
    positive_int,
    register,
)
from .svd import GRAM_ROWS, check_rank, gram_matrix, top_right_singular_vectors

# Arguments every calibrated method shares.
MIX = Arg("mix", fraction, 1.0, "tied matrices: weight of the output role (1 - mix: input role)")
DAMP = Arg("damp", non_negative_float, 0.01, "added to the metric's diagonal, relative to its mean")
FLOOR = Arg("floor", non_negative_float, 0.1, "row weights: floor as a fraction of the mean")


def need_calib(method: Method, ctx: FitContext):
    from .calibrate import CalibStats

    if not isinstance(ctx.calib, CalibStats):
        raise LmembedError(f"method {method.text!r} needs calibration statistics: pass calib= to lmembed.compress "
                           "(a text, a file or token ids) or --calib TEXT on the command line")
    return ctx.calib


def metric_for(method: Method, ctx: FitContext, dim: int) -> torch.Tensor:
    calib = need_calib(method, ctx)
    if calib.dim != dim:
        raise LmembedError(f"method {method.text!r}: calibration statistics are for d = {calib.dim}, the matrix has "
                           f"d = {dim} (calibrate the same model)")
    m = calib.column_metric(ctx.side, mix=method.mix)
    return m + method.damp * torch.eye(dim, dtype=m.dtype) * torch.diagonal(m).mean()


@register
class WeightedSVD(Method):
    needs_calib = True
    name = "wsvd"
    summary = "calibrated low-rank: SVD after whitening by the hidden-state second moments (needs calib)"
    positional = (Arg("rank", positive_int, required=True),)
    options = (MIX, DAMP, FLOOR)

    def check(self, num_embeddings: int, dim: int) -> None:
        check_rank(self, self.rank, dim)

    def fit(self, weight: torch.Tensor, ctx: FitContext) -> CompressedEmbedding:
        self.check(*weight.shape)
        calib = need_calib(self, ctx)
        w = weight.detach().cpu()
        m = metric_for(self, ctx, w.shape[1])
        chol = torch.linalg.cholesky(m)  # M = L Lᵀ: ||ΔE L||² is the weighted error
        r = calib.row_weights(ctx.side, mix=self.mix, floor=self.floor).double().sqrt()
        if len(r) != w.shape[0]:
            raise LmembedError(f"method {self.text!r}: calibration has {len(r)} tokens, the matrix {w.shape[0]} rows")
        # the right singular vectors of X = diag(r) W L, from its Gram matrix (X is never built)
        vk = top_right_singular_vectors(w, self.rank, gram=gram_matrix(w, chol, r)).double()
        proj = chol @ vk  # codes = W L Vk: the row weights cancel in the reconstruction
        codes = torch.cat([(c.double() @ proj).float() for c in w.split(GRAM_ROWS)])
        decoder = torch.linalg.solve_triangular(chol.t(), vk, upper=True).t()  # Vkᵀ L⁻¹
        return FactorizedEmbedding(codes, decoder.float())


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
    w = chunk.float().cpu().clone()
    scales = torch.zeros(v, math.ceil(d / group), dtype=torch.float16)
    q = torch.zeros(v, d, dtype=torch.int32)
    for i1 in range(0, d, block):
        i2 = min(i1 + block, d)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        s = None
        for j in range(i2 - i1):
            col = i1 + j
            if col % group == 0:
                g = col // group
                scales[:, g] = group_scales(w1[:, j : min(j + group, i2 - i1)], bits, grid, clip)
                s = scales[:, g].float().clamp_min(torch.finfo(torch.float16).tiny)
            code = to_codes(w1[:, j] / s, bits, grid)
            q[:, col] = code
            e = (w1[:, j] - from_codes(code, bits, grid) * s) / u1[j, j]
            w1[:, j:] -= e[:, None] * u1[j, j:][None, :]
            err1[:, j] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return pack_bits(q, bits), scales


class GPTQ(Method):
    needs_calib = True
    bits = 4
    positional = (GROUP,)
    options = (MIX, DAMP, GRID, CLIP)

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
    summary = "calibrated direction-aware autoencoder: ae in the whitened space, rows weighted (needs calib)"
    options = (*(a for a in AutoEncoder.options if a.name not in ("init", "epochs", "refit")),
               Arg("init", init_name, "svd", "svd (the weighted SVD solution) or random"),
               Arg("epochs", positive_int, 10),
               Arg("refit", bool_flag, True, "refit decoder and bias by weighted least squares on the codes"),
               MIX, DAMP, FLOOR)

    def fit(self, weight: torch.Tensor, ctx: FitContext) -> CompressedEmbedding:
        self.check(*weight.shape)
        calib = need_calib(self, ctx)
        w = weight.detach().double().cpu()
        chol = torch.linalg.cholesky(metric_for(self, ctx, w.shape[1]))
        rw = calib.row_weights(ctx.side, mix=self.mix, floor=self.floor)
        codes, dec_w, dec_b = self.train((w @ chol).float(), ctx, row_weight=rw)
        back = torch.linalg.inv(chol).float()  # X̂ L⁻¹: decoder and bias back to the embedding space
        return FactorizedEmbedding(codes, (dec_w.t() @ back).contiguous(), dec_b @ back)
