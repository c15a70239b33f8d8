"""Grad-CAM maps from a PyTorch checkpoint (MONAI GradCAM at model.bottleneck)."""
from __future__ import annotations

import logging

import numpy as np



log = logging.getLogger("cxrkit")


# ------------------------------------------------------------------------------------- Grad-CAM
def _class_logits_module(net):
    """The multi-task net seen as a classifier (a module with one child `net` returning the logits):
    MONAI's GradCAM wants a module returning logits. Defined inside a function: the package is
    torch-free on import."""
    import torch

    class _ClassLogits(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x).classification

    return _ClassLogits(net)


class GradCamExplainer:
    """Grad-CAM at the UNet bottleneck (the deepest encoder block) via monai.visualize.GradCAM.

    Two MONAI details are worked around here:
    * its default postprocessing (`default_normalizer`) maps (min, max) to (1, 0), i.e. it inverts
      the map; we take the raw map (identity postprocessing) and normalise for display ourselves;
    * with a per-sample class index tensor its class score is `logits[:, idx]`, a B x B block whose
      sum mixes the targets of the whole batch; so we call it once per distinct target class with an
      int index (samples are independent in eval mode, so grouping is exact).
    The model used here is a separate instance (rebuilt from the checkpoint), so the hooks MONAI
    registers never touch the inference model.
    """

    def __init__(self, checkpoint, device=None, model_and_ck=None):
        """checkpoint: a path; or pass model_and_ck=(model, ck) to explain an in-memory model (a deep
        copy is made, so MONAI's hooks never touch the caller's model)."""
        # torch / MONAI imported here, only when Grad-CAM is asked for (see the module docstring)
        import copy

        import torch
        from monai.visualize import GradCAM

        from .checkpoint import model_from_checkpoint
        if model_and_ck is not None:
            model, ck = copy.deepcopy(model_and_ck[0]).float(), model_and_ck[1]
        else:
            model, ck = model_from_checkpoint(checkpoint)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.class_names = list(ck["class_names"])
        self.img_size = int(ck["img_size"])
        self.ck = ck
        self.mismatch: str | None = None  # set when the run explains with another checkpoint than the model's
        self.net = _class_logits_module(model.to(self.device)).eval()
        # dotted name of the bottleneck inside the wrapper, e.g.
        # net.unet.model.1.submodule.1.submodule.1.submodule.1.submodule
        self.layer = next(n for n, m in self.net.named_modules() if m is model.bottleneck)
        self.cam = GradCAM(nn_module=self.net, target_layers=self.layer, postprocessing=lambda m: m)

    def __call__(self, x, class_idx) -> np.ndarray:
        """Raw Grad-CAM maps (B, S, S) float32 >= 0 (ReLU of the gradient-weighted bottleneck
        activations, bilinearly upsampled to the input size) for one target class per sample.
        x: the model input (B,3,S,S) float32, numpy or torch."""
        import torch
        x = torch.as_tensor(x, dtype=torch.float32).to(self.device)
        idx = np.broadcast_to(np.asarray(class_idx, np.int64), (x.shape[0],))
        out = np.zeros((x.shape[0], x.shape[2], x.shape[3]), np.float32)
        with torch.enable_grad():
            for c in np.unique(idx):
                sel = np.flatnonzero(idx == c)
                m = self.cam(x[torch.as_tensor(sel, device=x.device)], class_idx=int(c))
                out[sel] = m.detach().float().cpu().numpy()[:, 0]
        self.net.zero_grad(set_to_none=True)
        return out
