"""UnlearnModule: the Lightning loop that runs one unlearning method on one family."""

from __future__ import annotations

import copy

import lightning as L
import torch

from ..families.base import Family
from .methods import FrozenTeacher, TeacherCache, UnlearningMethod

COMPILED_HOOKS = ("embed", "predict", "task_loss")


def to_channels_last(family: Family) -> Family:
    """NHWC memory format for the 4-D weights (conv families on GPU); a no-op for the others' 2-D weights."""
    return family.to(memory_format=torch.channels_last)


def compile_hooks(family: Family, **options) -> Family:
    """``torch.compile`` the family's hooks the methods call (embed, predict, task_loss), in place."""
    for name in COMPILED_HOOKS:
        setattr(family, name, torch.compile(getattr(family, name), **options))
    return family


class UnlearnModule(L.LightningModule):
    """Trains ``student`` (a copy of the original) with ``method``; ``teacher`` stays frozen.

    Parameters the method does not train get ``requires_grad=False``, so they stay
    bit-identical, get no gradient (for encoder-only methods only the encoder runs backward) and
    DDP never waits for them. The teacher is kept in eval mode even when Lightning switches the
    module to train mode, and the methods call it through ``FrozenTeacher`` (inference mode;
    ``batch_teacher``: retain and forget/noise in one call where shapes allow; ``teacher_cache``:
    per-item outputs kept, exact only under a fixed degradation). ``channels_last`` and ``compile``
    are GPU options (off by default). The step logs tensors only: no host sync per step.
    """

    def __init__(self, original: Family, method: UnlearningMethod, batch_teacher: bool = True,
                 teacher_cache: bool = False, channels_last: bool = False, compile: bool = False):
        super().__init__()
        self.method = method
        self.student = copy.deepcopy(original).train()  # Lightning keeps the mode it is given
        self.teacher = copy.deepcopy(original).eval().requires_grad_(False)
        trainable = {id(p) for p in method.trainable_parameters(self.student)}
        for p in self.student.parameters():
            p.requires_grad_(id(p) in trainable)
        self.channels_last, self.compile_hooks = bool(channels_last), bool(compile)
        if self.channels_last:
            to_channels_last(self.student), to_channels_last(self.teacher)
        self.frozen = FrozenTeacher(self.teacher, batch=batch_teacher,
                                    cache=TeacherCache() if teacher_cache else None)

    def configure_model(self) -> None:
        # in the process that trains (after a DDP spawn): compiled functions do not pickle
        if self.compile_hooks and not getattr(self, "_compiled", False):
            compile_hooks(self.student), compile_hooks(self.teacher)
            self._compiled = True

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.channels_last:
            for part in batch.values():
                part["image"] = part["image"].contiguous(memory_format=torch.channels_last)
        return batch

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        forget = batch.get("forget") if self.method.needs_forget else None
        out = self.method.loss(self.student, self.frozen, forget, batch["retain"])
        bs = batch["retain"]["image"].shape[0]
        self.log("unlearn/loss", out["loss"], prog_bar=True, batch_size=bs)
        for k in ("retain", "forget"):
            if k in out:
                self.log(f"unlearn/{k}", out[k], batch_size=bs)
        return out["loss"]

    def configure_optimizers(self):
        """The method's optimiser over the trained parameters, and its lr schedule (per step) when it has one."""
        params = [p for p in self.student.parameters() if p.requires_grad]
        opt = self.method.optimizer(params)
        if self.method.scheduler is None:
            return opt
        sched = self.method.scheduler(opt, total_steps=self.method.steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
