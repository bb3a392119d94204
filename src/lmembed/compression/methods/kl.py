"""`kl:STEPS`: a short calibration fine-tune of a compressed matrix's own parameters.

Appended to a pipeline (``mixed:3.5 > kl:100``), it adjusts what the previous stage left
trainable so that the output layer's next-token distribution matches the original one on the
calibration hidden states: min KL(softmax(h Eᵀ) || softmax(h Êᵀ)). Trainable are the fp16 scales
of quantised rows (as log-multipliers, so they stay positive and steps are relative) and the
factors of a factorisation; integer codes stay fixed. A tied matrix also serves lookups, so a
term `inp` · mean_v f_v ||Ê_v - E_v||² (frequency weighted, relative to its starting value)
keeps the input role from drifting. Bounded by STEPS; deterministic for a seed. A stage that ends
worse on its own objective (judged on a fixed batch of calibration states) returns its input
unchanged, so appending it never makes a result worse on what it measures.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ...errors import LmembedError
from ..calibration.sensitivity import need_calib
from ..formats.base import CompressedEmbedding
from ..registry import Arg, FitContext, Method, non_negative_float, positive_float, positive_int, register


@register
class KLFinetune(Method):
    needs_calib = True
    name = "kl"
    summary = "calibration fine-tune of the previous stage's scales/factors (KL to the original next-token dist.)"
    whole_module = True
    keeps_form = True  # tunes scales and factors in place: codes stay codes
    positional = (Arg("steps", positive_int, required=True),)
    options = (
        Arg("lr", positive_float, 5e-3, "Adam learning rate of the log-scales (a relative step)"),
        Arg("flr", positive_float, 1e-3, "Adam learning rate of factors, relative to each factor's RMS"),
        Arg("batch", positive_int, 256, "calibration hidden states per step"),
        Arg("inp", non_negative_float, 1.0, "weight of the input-role term for tied matrices"),
    )

    follows = ("factors", "tunable")

    def makes(self, given: str) -> str:
        return given

    def check_model(self, model: torch.nn.Module) -> None:
        from ..integration.sites import find_sites

        if find_sites(model).output_module is None:
            raise LmembedError(f"method {self.text!r} matches output distributions, and {type(model).__name__} has no "
                               "output layer (an encoder): leave kl out of the pipeline")

    def fit(self, weight: torch.Tensor, ctx: FitContext) -> CompressedEmbedding:
        raise LmembedError(f"method {self.text!r} fine-tunes a compressed matrix: put it after a method "
                           "(e.g. 'mixed:3.5 > kl:100')")

    def apply(self, module: CompressedEmbedding, ctx: FitContext) -> CompressedEmbedding:
        calib = need_calib(self, ctx)
        if ctx.side == "input":
            raise LmembedError(f"method {self.text!r} matches output distributions: it needs an output role "
                               "(--side both/output on a model with an LM head)")
        if calib.hidden_sample is None or ctx.weight is None:
            raise LmembedError(f"method {self.text!r}: calibration has no hidden states of the output layer")
        teacher = ctx.weight.detach().float()
        if teacher.shape != (module.num_embeddings, module.embedding_dim):
            raise LmembedError(f"method {self.text!r}: the module is {module.num_embeddings} x "
                               f"{module.embedding_dim}, the original matrix {tuple(teacher.shape)}")
        hs = calib.hidden_sample.float()
        groups, quantized = self._trainables(module, self.lr, self.flr)
        if not groups:
            raise LmembedError(f"method {self.text!r}: {module.kind} has nothing to fine-tune")
        opt = torch.optim.Adam(groups)
        g = torch.Generator().manual_seed(ctx.seed)
        freq = calib.in_freq.float()
        freq = freq / freq.sum()
        tied = ctx.side == "tied" and self.inp > 0
        with torch.no_grad():
            base_inp = self._input_error(module, quantized, teacher, freq).clamp_min(1e-12) if tied else None
        probe = hs[torch.randperm(len(hs), generator=g)[:self.batch]]  # one fixed batch to judge the result by
        first = self._probe(module, quantized, probe, teacher, freq, base_inp)
        start = [t.detach().clone() for t in (*module.parameters(), *(q[2] for q in quantized))]
        for _ in tqdm(range(self.steps), desc=self.text, leave=False,
                      disable=None if ctx.progress is None else not ctx.progress):
            self._set_scales(quantized)
            h = hs[torch.randint(0, len(hs), (self.batch,), generator=g)]
            kl = self._kl(module, h, teacher)
            loss = kl
            if tied:
                loss = loss + self.inp * kl.detach().clamp_min(1e-6) * (
                    self._input_error(module, quantized, teacher, freq) / base_inp)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        last = self._probe(module, quantized, probe, teacher, freq, base_inp)
        kept = last[1] > first[1]  # its own objective got worse: hand back what the stage was given
        if kept:
            with torch.no_grad():
                for t, s in zip((*module.parameters(), *(q[2] for q in quantized)), start, strict=True):
                    t.copy_(s)
        self._set_scales(quantized, final=True)
        for p in module.parameters():
            p.requires_grad_(True)
        ctx.log(f"{self.text}: on {len(probe)} fixed calibration states, KL {first[0]:.4g} -> {last[0]:.4g}, "
                f"objective {first[1]:.4g} -> {last[1]:.4g}" + ("; worse, so its input is kept" if kept else ""))
        return module

    @staticmethod
    def _kl(module: CompressedEmbedding, h: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = F.log_softmax(h @ teacher.t(), -1)
        return F.kl_div(F.log_softmax(module.logits(h), -1), target, log_target=True, reduction="batchmean")

    def _probe(self, module, quantized, probe, teacher, freq, base_inp) -> tuple[float, float]:
        """(KL, the training objective) on the probe states: the objective adds the input-role term."""
        with torch.no_grad():
            self._set_scales(quantized)
            kl = self._kl(module, probe, teacher).item()
            if base_inp is None:
                return kl, kl
            return kl, kl * (1 + self.inp * (self._input_error(module, quantized, teacher, freq) / base_inp).item())

    @staticmethod
    def _trainables(module: CompressedEmbedding, lr: float, flr: float):
        """Adam groups with relative steps. A factor's lr is `flr` times its RMS: one fixed lr for
        factors of different scales diverged (5e-3 on SmolLM2's wsvd:432 factors, RMS 0.12 and
        0.24, took the calibration KL from 0.047 to 0.98)."""
        groups = [{"params": [p], "lr": flr * p.detach().float().pow(2).mean().sqrt().clamp_min(1e-12).item()}
                  for p in module.parameters()]
        quantized = []
        for m in module.modules():
            if isinstance(m, CompressedEmbedding) and m.tunable_scales:
                theta = torch.zeros(m.scales.shape, requires_grad=True)
                quantized.append((m, m.scales.float().clone(), theta))
                groups.append({"params": [theta], "lr": lr})
        return groups, quantized

    @staticmethod
    def _set_scales(quantized, final: bool = False) -> None:
        for m, s0, theta in quantized:
            s = s0 * theta.exp()
            m.scales = s.detach().to(torch.float16) if final else s

    def _input_error(self, module, quantized, teacher, freq) -> torch.Tensor:
        """Frequency-weighted squared error of the looked-up rows (the rows calibration saw)."""
        rows = freq.nonzero().flatten()
        self._set_scales(quantized)
        diff = module.lookup(rows) - teacher[rows]
        return (freq[rows] * diff.pow(2).sum(1)).sum()
