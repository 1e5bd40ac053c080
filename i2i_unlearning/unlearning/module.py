"""UnlearnModule: the Lightning loop that runs one unlearning method on one family."""

from __future__ import annotations

import copy

import lightning as L
import torch

from ..families.base import Family
from .methods import UnlearningMethod


class UnlearnModule(L.LightningModule):
    """Trains ``student`` (a copy of the original) with ``method``; ``teacher`` stays frozen.

    Parameters the method does not train get ``requires_grad=False``, so they stay
    bit-identical and DDP never waits for their gradients. The teacher is kept in eval
    mode even when Lightning switches the module to train mode.
    """

    def __init__(self, original: Family, method: UnlearningMethod):
        super().__init__()
        self.method = method
        self.student = copy.deepcopy(original).train()  # Lightning keeps the mode it is given
        self.teacher = copy.deepcopy(original).eval().requires_grad_(False)
        trainable = {id(p) for p in method.trainable_parameters(self.student)}
        for p in self.student.parameters():
            p.requires_grad_(id(p) in trainable)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        forget = batch.get("forget") if self.method.needs_forget else None
        out = self.method.loss(self.student, self.teacher, forget, batch["retain"])
        bs = batch["retain"]["image"].shape[0]
        self.log("unlearn/loss", out["loss"], prog_bar=True, batch_size=bs)
        for k in ("retain", "forget"):
            if k in out:
                self.log(f"unlearn/{k}", out[k], batch_size=bs)
        return out["loss"]

    def configure_optimizers(self):
        params = [p for p in self.student.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.method.lr, weight_decay=self.method.weight_decay)
