"""The direction-aware autoencoder of Bałazy et al. 2021 ("Direction is what you need").

A linear encoder (d -> k, with bias, optional ELU on the codes) and a linear decoder (k -> d, with
bias) trained on the rows of the embedding matrix with a loss that cares mostly about each row's
*direction*:

    loss = (1 - lam) / cos_div * mean(1 - cos(x_hat, x))
         + lam * mean((|x_hat - x| + 1e-10) ** alpha)
         + l2 * sqrt(mean((x_hat - x) ** 2))

with alpha annealed linearly from alpha0 to alpha1 over the first `anneal` epochs. The defaults
are the authors' published configuration: lam = 0.0025 (cosine weight 0.9975 / 5), alpha 1 ->
0.1 over 20 epochs, 30 epochs, Adam lr 1e-3 halved every 4 epochs, batch 32, l2 = 0. After
training only the codes (encoder output for every row, V x k) and the decoder are kept, so the
result is a FactorizedEmbedding like SVD's, with the decoder bias as an extra d floats.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ...errors import LmembedError
from ..formats.base import CompressedEmbedding
from ..formats.dense import FactorizedEmbedding
from ..registry import (
    Arg,
    FitContext,
    Method,
    bool_flag,
    choice,
    non_negative_float,
    positive_float,
    positive_int,
    register,
)
from .svd import check_rank, top_right_singular_vectors

init_name = choice("random", "svd")


def ae_loss(x_hat: torch.Tensor, x: torch.Tensor, *, lam: float, cos_div: float, alpha: float,
            l2: float = 0.0, row_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The direction-aware reconstruction loss (module docstring), averaged over the batch;
    `row_weight` (mean ~1) weighs each row's terms (calibrated variant)."""
    w = row_weight if row_weight is not None else torch.ones(len(x), device=x.device)
    loss = (1 - lam) / cos_div * (w * (1 - F.cosine_similarity(x_hat, x, dim=-1))).mean()
    if lam:
        loss = loss + lam * (w[:, None] * ((x_hat - x).abs() + 1e-10).pow(alpha)).mean()
    if l2:
        loss = loss + l2 * (w[:, None] * (x_hat - x).pow(2)).mean().sqrt()
    return loss


@register
class AutoEncoder(Method):
    name = "ae"
    summary = "direction-aware autoencoder (MSE/L^alpha + cosine loss), rank k; options as in Bałazy et al."
    positional = (Arg("rank", positive_int, required=True),)
    options = (
        Arg("lam", non_negative_float, 0.0025, "weight of the magnitude term; the cosine term gets 1 - lam"),
        Arg("cos_div", non_negative_float, 5.0, "divisor of the cosine term's weight"),
        Arg("l2", non_negative_float, 0.0, "weight of an RMSE term"),
        Arg("alpha0", non_negative_float, 1.0, "exponent of |x_hat - x| at the start"),
        Arg("alpha1", non_negative_float, 0.1, "exponent after annealing"),
        Arg("anneal", positive_int, 20, "epochs over which alpha goes from alpha0 to alpha1"),
        Arg("epochs", positive_int, 30),
        Arg("lr", positive_float, 1e-3),
        Arg("batch", positive_int, 32),
        Arg("step", positive_int, 4, "StepLR step size (epochs)"),
        Arg("gamma", non_negative_float, 0.5, "StepLR factor"),
        Arg("elu", bool_flag, False, "ELU on the codes"),
        Arg("init", init_name, "random", "random or svd (start from the truncated SVD solution)"),
        Arg("refit", bool_flag, False, "after training, refit decoder and bias by least squares on the codes"),
    )

    def makes(self, given: str) -> str:
        return "factors"

    def check(self, num_embeddings: int, dim: int) -> None:
        check_rank(self, self.rank, dim)
        if not 0 <= self.lam <= 1:
            raise LmembedError(f"method {self.text!r}: lam {self.lam} must be in [0, 1]")
        if self.cos_div == 0:
            raise LmembedError(f"method {self.text!r}: cos_div must be > 0")

    def alpha_at(self, epoch: int) -> float:
        """0-based epoch -> exponent of the magnitude term."""
        t = min(epoch / self.anneal, 1.0)
        return self.alpha0 - (self.alpha0 - self.alpha1) * t

    def fit(self, weight: torch.Tensor, ctx: FitContext) -> CompressedEmbedding:
        self.check(*weight.shape)
        codes, dec_w, dec_b = self.train(weight.detach().float(), ctx)
        return FactorizedEmbedding(codes, dec_w.t().contiguous(), dec_b)

    def train(self, x_all: torch.Tensor, ctx: FitContext,
              row_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes V x k, decoder weight d x k, decoder bias d) of an autoencoder fitted to the rows."""
        v, d, k = x_all.shape[0], x_all.shape[1], self.rank
        dev = ctx.device
        x_all = x_all.to(dev)
        rw = row_weight.float().to(dev) if row_weight is not None else None
        gen = torch.Generator(device="cpu").manual_seed(ctx.seed)
        if self.init == "svd":
            vk = top_right_singular_vectors(x_all, k)  # d x k
            enc_w, dec_w = vk.t().clone(), vk.clone()
        else:  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), from our own generator
            enc_w = (torch.rand(k, d, generator=gen) * 2 - 1) / math.sqrt(d)
            dec_w = (torch.rand(d, k, generator=gen) * 2 - 1) / math.sqrt(k)
        params = [t.to(dev).requires_grad_() for t in (enc_w, torch.zeros(k), dec_w, torch.zeros(d))]
        enc_w, enc_b, dec_w, dec_b = params
        opt = torch.optim.Adam(params, lr=self.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=self.step, gamma=self.gamma)

        def encode(x: torch.Tensor) -> torch.Tensor:
            z = F.linear(x, enc_w, enc_b)
            return F.elu(z) if self.elu else z

        steps = math.ceil(v / self.batch)
        bar = tqdm(total=self.epochs * steps, desc=f"ae:{k}", leave=False, dynamic_ncols=True, mininterval=1.0,
                   disable=None if ctx.progress is None else not ctx.progress)
        loss_val = float("nan")
        for epoch in range(self.epochs):
            alpha = self.alpha_at(epoch)
            perm = torch.randperm(v, generator=gen).to(dev)
            for s in range(0, v, self.batch):
                idx = perm[s : s + self.batch]
                x = x_all[idx]
                loss = ae_loss(F.linear(encode(x), dec_w, dec_b), x, lam=self.lam, cos_div=self.cos_div,
                               alpha=alpha, l2=self.l2, row_weight=rw[idx] if rw is not None else None)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            bar.update(steps)
            sched.step()
            with torch.no_grad():
                loss_val = ae_loss(F.linear(encode(x_all), dec_w, dec_b), x_all, lam=self.lam,
                                   cos_div=self.cos_div, alpha=alpha, l2=self.l2, row_weight=rw).item()
            if not math.isfinite(loss_val):
                raise LmembedError(f"method {self.text!r}: loss became {loss_val} in epoch {epoch + 1}; "
                                   "lower lr or use init=svd")
            bar.set_postfix(loss=f"{loss_val:.4g}")
        bar.close()
        ctx.log(f"{self.text}: final loss {loss_val:.5g}")
        with torch.no_grad():
            codes = encode(x_all)
        if self.refit:
            w, b = refit_decoder(codes.cpu(), x_all.cpu(), rw.cpu() if rw is not None else None)
            return codes.cpu(), w, b
        return codes.cpu(), dec_w.detach().cpu(), dec_b.detach().cpu()


def refit_decoder(codes: torch.Tensor, x: torch.Tensor,
                  row_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(decoder d x k, bias d) minimising sum_i w_i ||c_i D + b - x_i||^2 for fixed codes.

    The direction-aware loss barely constrains row norms (its magnitude term has weight 0.0025),
    which costs little for an input embedding but a lot where the rows are read as logits or in a
    whitened space; the closed-form refit keeps the learned code directions and restores the
    least-squares magnitudes."""
    a = torch.cat([codes.double(), torch.ones(codes.shape[0], 1, dtype=torch.float64)], 1)
    w = torch.ones(codes.shape[0], dtype=torch.float64) if row_weight is None else row_weight.double()
    gram = a.t() @ (a * w[:, None])
    gram += 1e-8 * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=torch.float64)
    sol = torch.linalg.solve(gram, a.t() @ (x.double() * w[:, None]))  # (k+1) x d
    return sol[:-1].t().float().contiguous(), sol[-1].float()

