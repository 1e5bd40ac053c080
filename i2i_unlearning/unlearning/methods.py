"""Unlearning methods, written only against the family interface (families/base.py).

Each method is chosen by Hydra ``_target_`` (conf/method/*.yaml) and says:
  * what it trains (``encoder_only``) and whether it trains at all (``trains``);
  * which model it starts from (``start_from``: the original, or the retrain reference);
  * which split stands for D_R (``retain_split``: ``retain_train``, or ``proxy_train``);
  * its loss on a forget batch and a retain batch, given the student and the frozen
    original (the teacher).

The formulas are in docs/algorithms.md. Batches are dicts with "image" and "mask" (and, from the
data module, "key": the items' ids, which the optional teacher cache uses).

Frozen-teacher fast paths (``FrozenTeacher``): every teacher call runs under ``torch.inference_mode``
and hands back ordinary tensors (clones: inference tensors cannot be saved for backward, and a loss
target is); a method's teacher calls of one step go in ONE batched call when the family says their
shapes allow (``Family.batchable``); with a cache, per-item outputs are kept under (item key, mask),
exact by construction (a changed mask is a miss) and only for families whose inputs carry no random
state (not diffusion).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.degrade import noise_image
from ..errors import ConfigError
from ..families.base import Embedding, Family


def embedding_mse(student: Embedding, target: Embedding) -> Tensor:
    """Squared, mean-reduced L2 between embeddings; a list of feature maps is summed."""
    if isinstance(student, Tensor):
        return F.mse_loss(student, target)
    return sum(F.mse_loss(s, t) for s, t in zip(student, target, strict=True))


def _map(fn, emb: Embedding) -> Embedding:
    return fn(emb) if isinstance(emb, Tensor) else [fn(e) for e in emb]


def _clone(out: Embedding) -> Embedding:
    """Ordinary (non-inference) copies of teacher outputs, usable as loss targets under autograd."""
    return _map(torch.Tensor.clone, out)


def _rows(out: Embedding, index) -> Embedding:
    return _map(lambda t: t[index], out)


class TeacherCache:
    """Teacher outputs per item, keyed by (function, item key, the item's mask bytes).

    Exact by construction: an item seen under another mask is a miss. A hit returns the rows stored
    when the item was first computed (equal to a recomputation up to the float round-off of the batch
    it was computed in; bit-equal for the same batch). Holds at most ``max_items`` entries (then it
    stops adding). Worth it only with a fixed degradation per item (``++data.train_task=center_half``):
    with random training masks every lookup misses.
    """

    def __init__(self, max_items: int = 200_000):
        self.max_items = int(max_items)
        self.store: dict[tuple, Embedding] = {}
        self.hits = self.misses = 0

    @staticmethod
    def _mask_ids(mask: Tensor) -> list[bytes]:
        flat = np.packbits(mask.detach().flatten(1).to("cpu", torch.bool).numpy(), axis=1)
        return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat]

    def _keys(self, fn: str, keys: list[str], mask: Tensor) -> list[tuple]:
        return [(fn, k, m) for k, m in zip(keys, self._mask_ids(mask), strict=True)]

    def lookup(self, fn: str, keys: list[str], mask: Tensor) -> Embedding | None:
        """The stacked outputs of every item, or None unless all of them are cached."""
        entries = [self.store.get(k) for k in self._keys(fn, keys, mask)]
        if any(e is None for e in entries):
            self.misses += 1
            return None
        self.hits += 1
        if isinstance(entries[0], Tensor):
            return torch.stack(entries)
        return [torch.stack(parts) for parts in zip(*entries, strict=True)]

    def add(self, fn: str, keys: list[str], mask: Tensor, out: Embedding) -> None:
        for i, k in enumerate(self._keys(fn, keys, mask)):
            if len(self.store) >= self.max_items:
                return
            self.store[k] = _map(lambda t, i=i: t[i].clone(), out)


class FrozenTeacher:
    """The frozen original as the methods call it: inference mode, batched calls, optional cache.

    ``outputs(fn, requests)`` evaluates ``teacher.<fn>(image, mask, state=state)`` for each request
    ``(image, mask, state, keys)``; requests whose shapes the family can batch run as one call.
    """

    def __init__(self, family: Family, batch: bool = True, cache: TeacherCache | None = None):
        self.family, self.batch, self.cache = family, batch, cache

    def _run(self, fn: str, requests: list[tuple]) -> list[Embedding]:
        call = getattr(self.family, fn)
        with torch.inference_mode():
            if self.batch and len(requests) > 1 and self.family.batchable([r[1] for r in requests]):
                sizes = [r[0].shape[0] for r in requests]
                state = self.family.join_states([r[2] for r in requests])
                out = call(torch.cat([r[0] for r in requests]), torch.cat([r[1] for r in requests]), state=state)
                parts, start = [], 0
                for n in sizes:
                    parts.append(_rows(out, slice(start, start + n)))
                    start += n
            else:
                parts = [call(image, mask, state=state) for image, mask, state, _ in requests]
        return [_clone(p) for p in parts]

    def outputs(self, fn: str, requests: list[tuple]) -> list[Embedding]:
        results: list[Embedding | None] = [None] * len(requests)
        cacheable = [self.cache is not None and r[3] is not None and r[2] is None for r in requests]
        for i, r in enumerate(requests):
            if cacheable[i]:
                results[i] = self.cache.lookup(fn, r[3], r[1])
        todo = [i for i, out in enumerate(results) if out is None]
        if todo:
            for i, out in zip(todo, self._run(fn, [requests[i] for i in todo]), strict=True):
                results[i] = out
                if cacheable[i]:
                    self.cache.add(fn, requests[i][3], requests[i][1], out)
        return results


def teacher_outputs(teacher, fn: str, requests: list[tuple]) -> list[Embedding]:
    """``FrozenTeacher.outputs`` on ``teacher`` (a bare family is wrapped: batched, no cache)."""
    if not isinstance(teacher, FrozenTeacher):
        teacher = FrozenTeacher(teacher)
    return teacher.outputs(fn, requests)


def student_embeds(student: Family, teacher, requests: list[tuple]) -> list[Embedding]:
    """The student's embeddings of ``(image, mask, state)`` requests, in one batched call when the
    family allows it (as the teacher's: a student equal to the teacher then gives equal embeddings,
    bit for bit) and batching is on (``FrozenTeacher.batch``)."""
    batch = teacher.batch if isinstance(teacher, FrozenTeacher) else True
    if batch and len(requests) > 1 and student.batchable([r[1] for r in requests]):
        out = student.embed(torch.cat([r[0] for r in requests]), torch.cat([r[1] for r in requests]),
                            state=student.join_states([r[2] for r in requests]))
        parts, start = [], 0
        for r in requests:
            parts.append(_rows(out, slice(start, start + r[0].shape[0])))
            start += r[0].shape[0]
        return parts
    return [student.embed(image, mask, state=state) for image, mask, state in requests]


def draw_state(student: Family, batch: dict):
    """One random state (e.g. a diffusion timestep and noise) for ``batch``, drawn once and given to
    the student and the teacher alike, so both see the same noisy input."""
    return student.sample_state(batch["image"], batch["mask"])


class UnlearningMethod:
    """Base class: a named loss over (forget, retain) batches plus what it trains."""

    trains = True
    encoder_only = False
    needs_forget = True
    family_training = False  # True: the method is the family's own training on D_R (finetune)
    start_from = "original"

    def __init__(
        self,
        name: str,
        alpha: float = 1.0,
        steps: int = 200,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        batch_size: int = 64,
        retain_split: str = "retain_train",
        noise: str = "normal",
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
    ):
        if retain_split not in ("retain_train", "proxy_train"):
            raise ConfigError(
                f"method.retain_split={retain_split!r}: use 'retain_train' or 'proxy_train' (retain-set-free)"
            )
        if self.trains and steps < 1:
            raise ConfigError(f"method.steps={steps}: a training method needs at least one step")
        self.name = name
        self.alpha = float(alpha)
        self.steps = int(steps)
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.batch_size = int(batch_size)
        self.retain_split = retain_split
        self.noise = noise
        # params -> optimiser (a `_partial_` config node); None: AdamW at ``lr`` / ``weight_decay``
        self.optimizer = optimizer or partial(torch.optim.AdamW, lr=self.lr, weight_decay=self.weight_decay)

    def trainable_parameters(self, student: Family) -> list[torch.nn.Parameter]:
        """Parameters the optimiser updates (the encoder only, or the whole model)."""
        return list(student.encoder_parameters() if self.encoder_only else student.parameters())

    def noise_like(self, images: Tensor) -> Tensor:
        """The noise image n of docs/algorithms.md (uniform, normal (moment-matched) or constant)."""
        return noise_image(images, self.noise)

    def loss(self, student: Family, teacher: Family, forget: dict | None, retain: dict) -> dict[str, Tensor]:
        """Return {"loss": total, "retain": retain term, "forget": forget term (if any)}."""
        raise NotImplementedError


class Reference(UnlearningMethod):
    """No unlearning step: ``original`` evaluates the original model, ``retrain`` the gold standard."""

    trains = False
    needs_forget = False

    def __init__(self, name: str, start_from: str = "original", **kwargs):
        if start_from not in ("original", "retrain"):
            raise ConfigError(f"method.start_from={start_from!r}: use 'original' or 'retrain'")
        super().__init__(name, **kwargs)
        self.start_from = start_from


class Ours(UnlearningMethod):
    """Encoder-only: retain embeddings stay E0's; forget embeddings go to E0(T(noise))."""

    encoder_only = True

    def loss(self, student, teacher, forget, retain):
        sr, sf = draw_state(student, retain), draw_state(student, forget)
        noise = self.noise_like(forget["image"])  # the teacher draws nothing, so the RNG order is unchanged
        r_target, f_target = teacher_outputs(teacher, "embed", [
            (retain["image"], retain["mask"], sr, retain.get("key")), (noise, forget["mask"], sf, None)])
        r_emb, f_emb = student_embeds(student, teacher, [(retain["image"], retain["mask"], sr),
                                                         (forget["image"], forget["mask"], sf)])
        r, f = embedding_mse(r_emb, r_target), embedding_mse(f_emb, f_target)
        return {"loss": r + self.alpha * f, "retain": r, "forget": f}


class RandomEncoder(UnlearningMethod):
    """Encoder-only: forget target = Gaussian with the statistics of E0's forget embeddings."""

    encoder_only = True

    def loss(self, student, teacher, forget, retain):
        sr, sf = draw_state(student, retain), draw_state(student, forget)
        r_target, f_teacher = teacher_outputs(teacher, "embed", [
            (retain["image"], retain["mask"], sr, retain.get("key")),
            (forget["image"], forget["mask"], sf, forget.get("key"))])
        f_target = _map(lambda t: torch.randn_like(t) * t.std() + t.mean(), f_teacher)
        r_emb, f_emb = student_embeds(student, teacher, [(retain["image"], retain["mask"], sr),
                                                         (forget["image"], forget["mask"], sf)])
        r, f = embedding_mse(r_emb, r_target), embedding_mse(f_emb, f_target)
        return {"loss": r + self.alpha * f, "retain": r, "forget": f}


class MaxLoss(UnlearningMethod):
    """Full model, gradient ascent on forget: task loss on D_R minus alpha * task loss on D_F."""

    def loss(self, student, teacher, forget, retain):
        r = student.task_loss(retain["image"], retain["mask"])
        f = student.task_loss(forget["image"], forget["mask"])
        return {"loss": r - self.alpha * f, "retain": r, "forget": f}


class NoisyLabel(UnlearningMethod):
    """Full model: forget targets are the task targets of a noise image."""

    def loss(self, student, teacher, forget, retain):
        r = student.task_loss(retain["image"], retain["mask"])
        noisy_target = student.target_of(self.noise_like(forget["image"]))
        f = student.task_loss(forget["image"], forget["mask"], target=noisy_target)
        return {"loss": r + self.alpha * f, "retain": r, "forget": f}


class RetainLabel(UnlearningMethod):
    """Full model: distil D_R to the original's outputs; D_F targets = original outputs of
    *other* (retain) images of the batch under the forget mask."""

    def loss(self, student, teacher, forget, retain):
        xr, mr, xf, mf = retain["image"], retain["mask"], forget["image"], forget["mask"]
        sr, sf = draw_state(student, retain), draw_state(student, forget)
        idx = torch.arange(xf.shape[0], device=xr.device) % xr.shape[0]
        keys = retain.get("key")
        other_keys = None if keys is None else [keys[i % len(keys)] for i in range(xf.shape[0])]
        r_target, f_target = teacher_outputs(teacher, "predict", [
            (xr, mr, sr, keys), (xr[idx], mf, sf, other_keys)])
        r = student.task_loss(xr, mr, target=r_target, state=sr)
        f = student.task_loss(xf, mf, target=f_target, state=sf)
        return {"loss": r + self.alpha * f, "retain": r, "forget": f}


class Finetune(UnlearningMethod):
    """Reference: continue training the full model on D_R only."""

    needs_forget = False
    family_training = True  # the family's own training on D_R: a runner may run it with the family's own step

    def loss(self, student, teacher, forget, retain):
        r = student.task_loss(retain["image"], retain["mask"])
        return {"loss": r, "retain": r}
