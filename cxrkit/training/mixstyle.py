"""MixStyle (Zhou, Yang, Qiao, Xiang, ICLR 2021, "Domain generalization with MixStyle"): issue 22's
lever (g). During training, on a share of the batches, the early encoder blocks' per-channel feature
statistics (mean and standard deviation over the image) of every film are mixed with another film's,
with a Beta(alpha, alpha) weight. Those statistics carry a film's processing and exposure (its "style"),
not its anatomy, so mixing them across films of different sources and classes takes "looks like source
X" away as a cue for the class. It has no weights and is off in eval mode: validation, calibration,
the gate and the exported graph never see it.
"""
import numpy as np
import torch
import torch.nn as nn


class StyleMix:
    """Forward hooks on model.style_layers(). Call next_batch() before every training forward: it draws,
    from the epoch's generator (so --resume stays bit-identical), whether this batch is mixed, the
    partner of each film and the weights. One draw serves every style layer of the batch (the paper's
    code draws per layer): the same film is re-styled like the same partner throughout the encoder."""

    def __init__(self, model: nn.Module, p: float, alpha: float, eps: float = 1e-6):
        self.p, self.alpha, self.eps = p, alpha, eps
        self.draw: tuple[torch.Tensor, torch.Tensor] | None = None
        # prepend: the mixed output is what every later hook sees too (the MONAI networks' multiscale
        # classifier reads the levels' outputs through hooks of its own, registered when it was built)
        self.handles = [layer.register_forward_hook(self._hook, prepend=True) for layer in model.style_layers()]

    def next_batch(self, b: int, gen: torch.Generator) -> None:
        self.draw = None
        if b < 2 or torch.rand(1, generator=gen).item() >= self.p:
            return
        perm = torch.randperm(b, generator=gen)
        rng = np.random.default_rng(int(torch.randint(2**31 - 1, (1,), generator=gen)))
        self.draw = perm, torch.from_numpy(rng.beta(self.alpha, self.alpha, size=b).astype(np.float32))

    def _hook(self, module: nn.Module, _inputs, out: torch.Tensor):
        if not module.training or self.draw is None:
            return None
        perm, lam = self.draw
        lam = lam.to(out.device).view(-1, 1, 1, 1)
        x = out.float()  # statistics in FP32 also under CUDA autocast (BF16/FP16 activations)
        # the statistics are detached, as in the paper: the network is not trained through the mixing
        mu = x.mean(dim=(2, 3), keepdim=True).detach()
        sig = (x.var(dim=(2, 3), keepdim=True) + self.eps).sqrt().detach()
        mu_mix = lam * mu + (1 - lam) * mu[perm]
        sig_mix = lam * sig + (1 - lam) * sig[perm]
        return ((x - mu) / sig * sig_mix + mu_mix).to(out.dtype)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
