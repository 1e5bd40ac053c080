"""Unlearning methods, written only against the family interface (families/base.py).

Each method is chosen by Hydra ``_target_`` (conf/method/*.yaml) and says:
  * what it trains (``encoder_only``) and whether it trains at all (``trains``);
  * which model it starts from (``start_from``: the original, or the retrain reference);
  * which split stands for D_R (``retain_split``: ``retain_train``, or ``proxy_train``);
  * its loss on a forget batch and a retain batch, given the student and the frozen
    original (the teacher).

The formulas are in docs/algorithms.md. Batches are dicts with "image" and "mask" (and, from the
data module, "key": the items' ids, which the optional teacher cache uses).

Two constructions (``method.construction``): ``paper`` writes each loss as the paper does (a mean per
split); ``reference`` builds it as the public code (the paper's released MAGE and Palette code) does:
one mixed batch of retain and forget rows reduced as a whole (`mixed_terms`), noise statistics of the
whole mixed batch, and each family's own forget inputs and targets (the reference hooks of
families/base.py). Each method class keeps both behind one switch.

Frozen-teacher fast paths (``FrozenTeacher``): every teacher call runs under ``torch.inference_mode``
and hands back ordinary tensors (clones: inference tensors cannot be saved for backward, and a loss
target is); a method's teacher calls of one step go in ONE batched call when the family says their
shapes allow (``Family.batchable``); with a cache, per-item outputs are kept under (item key, mask),
exact by construction (a changed mask is a miss) and only for families whose inputs carry no random
state (not diffusion).
"""

from __future__ import annotations

import hashlib
import math
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


CONSTRUCTIONS = ("paper", "reference")


def row_mse(out: Embedding, target: Embedding) -> Tensor:
    """Per-row mean squared error (B,), the public code's per-sample reduction; a list of feature maps is summed."""
    if isinstance(out, Tensor):
        return (out - target).pow(2).flatten(1).mean(1)
    return sum(row_mse(o, t) for o, t in zip(out, target, strict=True))


def mixed_terms(retain_rows: Tensor, forget_rows: Tensor) -> tuple[Tensor, Tensor]:
    """The public code's reduction of one mixed batch: each term is the sum of its own rows' losses over the
    number of ALL rows (retain + forget), so each is scaled by its share of the batch. (MAGE's ``ours`` and its
    embedding / logit baselines weight a row by 1 +- its label, twice this: a constant scale.)"""
    total = retain_rows.shape[0] + forget_rows.shape[0]
    return retain_rows.sum() / total, forget_rows.sum() / total


def gaussian_like(like: Tensor, stats: Tensor) -> Tensor:
    """N(mean, std^2) noise shaped like ``like``, with the scalar mean and std of ``stats``'s values."""
    return torch.randn_like(like) * stats.std() + stats.mean()


def _map(fn, emb: Embedding, *more: Embedding) -> Embedding:
    """``fn`` over a tensor, or over each feature map of a list (zipped with the maps of ``more``)."""
    return fn(emb, *more) if isinstance(emb, Tensor) else [fn(*maps) for maps in zip(emb, *more, strict=True)]


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


def student_outputs(student: Family, teacher, fn: str, requests: list[tuple]) -> list[Embedding]:
    """The student's ``fn`` (``embed``, ``raw_output``) of ``(image, mask, state)`` requests, in one batched call
    when the family allows it (as the teacher's: a student equal to the teacher then gives equal outputs,
    bit for bit) and batching is on (``FrozenTeacher.batch``)."""
    call = getattr(student, fn)
    batch = teacher.batch if isinstance(teacher, FrozenTeacher) else True
    if batch and len(requests) > 1 and student.batchable([r[1] for r in requests]):
        out = call(torch.cat([r[0] for r in requests]), torch.cat([r[1] for r in requests]),
                   state=student.join_states([r[2] for r in requests]))
        parts, start = [], 0
        for r in requests:
            parts.append(_rows(out, slice(start, start + r[0].shape[0])))
            start += r[0].shape[0]
        return parts
    return [call(image, mask, state=state) for image, mask, state in requests]


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
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        forget_batch_size: int | None = None,
        gradient_clip_val: float | None = None,
        ema_decay: float | None = None,
        epochs: float | None = None,
        construction: str = "paper",
    ):
        if retain_split not in ("retain_train", "proxy_train"):
            raise ConfigError(
                f"method.retain_split={retain_split!r}: use 'retain_train' or 'proxy_train' (retain-set-free)"
            )
        if self.trains and steps < 1:
            raise ConfigError(f"method.steps={steps}: a training method needs at least one step")
        if construction not in CONSTRUCTIONS:
            raise ConfigError(f"method.construction={construction!r}: use one of {list(CONSTRUCTIONS)} (paper: the "
                              "formulas as the paper writes them; reference: as the public code builds them)")
        if forget_batch_size is not None and forget_batch_size < 1:
            raise ConfigError(f"method.forget_batch_size={forget_batch_size}: use a positive integer, or null "
                              "(as method.batch_size)")
        if epochs is not None and epochs <= 0:
            raise ConfigError(f"method.epochs={epochs}: use a positive number of passes, or null (method.steps)")
        if ema_decay is not None and not 0.0 <= ema_decay <= 1.0:
            raise ConfigError(f"method.ema_decay={ema_decay}: use a decay in [0, 1], or null (no weight average)")
        self.name = name
        self.alpha = float(alpha)
        self.steps = int(steps)
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.batch_size = int(batch_size)
        self.retain_split = retain_split
        self.noise = noise
        self.construction = construction  # "paper" | "reference" (the module docstring)
        # params -> optimiser (a `_partial_` config node); None: AdamW at ``lr`` / ``weight_decay``
        self.optimizer = optimizer or partial(torch.optim.AdamW, lr=self.lr, weight_decay=self.weight_decay)
        # (optimiser, total_steps) -> lr schedule stepped per optimiser step (a `_partial_` node); None: constant lr
        self.scheduler = scheduler
        self.forget_batch_size = int(forget_batch_size or batch_size)  # forget rows per step (D_F stream)
        self.gradient_clip_val = gradient_clip_val  # clip the gradient norm of the unlearning steps only
        self.ema_decay = ema_decay  # an exponential moving average of the trained weights is the result
        self.epochs = epochs  # passes over D_F + D_R; set: `steps` follows from the data (`set_epochs`)

    def set_epochs(self, forget_images: int, retain_images: int) -> None:
        """With ``epochs``: ``steps`` = epochs x (forget + retain images) / (rows per step), as the public code
        counts an epoch over its mixed forget + retain set."""
        if self.epochs is not None:
            rows = self.batch_size + (self.forget_batch_size if self.needs_forget else 0)
            images = retain_images + (forget_images if self.needs_forget else 0)
            self.steps = max(1, math.ceil(self.epochs * images / rows))

    def trainable_parameters(self, student: Family) -> list[torch.nn.Parameter]:
        """Parameters the optimiser updates (the encoder only, or the whole model)."""
        return list(student.encoder_parameters() if self.encoder_only else student.parameters())

    def noise_like(self, images: Tensor) -> Tensor:
        """The noise image n of docs/algorithms.md (uniform, normal (moment-matched) or constant)."""
        return noise_image(images, self.noise)

    def loss(self, student: Family, teacher: Family, forget: dict | None, retain: dict) -> dict[str, Tensor]:
        """Return {"loss": total, "retain": retain term, "forget": forget term (if any)}."""
        raise NotImplementedError

    def combine(self, r: Tensor, f: Tensor) -> dict[str, Tensor]:
        """The loss r + alpha * f with its two terms."""
        return {"loss": r + self.alpha * f, "retain": r, "forget": f}

    def mse_terms(self, r_out: Embedding, r_target: Embedding, f_out: Embedding, f_target: Embedding
                  ) -> dict[str, Tensor]:
        """Squared distances of retain and forget outputs to their targets: each split's mean (``paper``), or the
        per-row means reduced over the mixed batch (``reference``, `mixed_terms`)."""
        if self.construction == "reference":
            return self.combine(*mixed_terms(row_mse(r_out, r_target), row_mse(f_out, f_target)))
        return self.combine(embedding_mse(r_out, r_target), embedding_mse(f_out, f_target))


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
    """Encoder-only: retain embeddings stay E0's; forget embeddings go to E0(T(noise)).

    ``reference``: the forget target is E0 of the public code's noise input (`noise_request`), both terms
    reduced over the mixed batch."""

    encoder_only = True

    def loss(self, student, teacher, forget, retain):
        sr, sf = draw_state(student, retain), draw_state(student, forget)
        r_target, f_target = teacher_outputs(teacher, "embed", [
            (retain["image"], retain["mask"], sr, retain.get("key")), self.noise_request(student, forget, retain, sf)])
        r_emb, f_emb = student_outputs(student, teacher, "embed", [(retain["image"], retain["mask"], sr),
                                                                  (forget["image"], forget["mask"], sf)])
        return self.mse_terms(r_emb, r_target, f_emb, f_target)

    def noise_request(self, student: Family, forget: dict, retain: dict, state) -> tuple:
        """The teacher's (image, mask, state, key) for the forget target. ``paper``: a noise image of the forget
        batch. ``reference``: the forget image with pure noise in its hole, same timestep and noise, where the
        family has such a state (diffusion, as the public Palette code); else a noise image with the statistics
        of the whole mixed batch (as the public MAGE code)."""
        if self.construction == "paper":  # the teacher draws nothing, so the RNG order is unchanged
            return self.noise_like(forget["image"]), forget["mask"], state, None
        pure = student.pure_noise_state(state)
        if pure is not None:
            return forget["image"], forget["mask"], pure, None
        mixed = torch.cat([retain["image"], forget["image"]])
        return self.noise_like(mixed)[retain["image"].shape[0]:], forget["mask"], state, None


class RandomEncoder(UnlearningMethod):
    """Encoder-only: forget target = Gaussian with the statistics of E0's forget embeddings.

    ``reference``: the statistics are those of E0's embeddings of the whole mixed batch (per feature map), whose
    forget rows the teacher sees as the public code feeds them (diffusion: pure noise in the hole, as Palette's
    branch of this baseline does); both terms reduced over the mixed batch. The released MAGE baseline code
    weights both terms by (1 + label), so its forget term never reaches a forget row; here it does (the fix)."""

    encoder_only = True

    def loss(self, student, teacher, forget, retain):
        sr, sf = draw_state(student, retain), draw_state(student, forget)
        reference = self.construction == "reference"
        pure = student.pure_noise_state(sf) if reference else None
        r_target, f_teacher = teacher_outputs(teacher, "embed", [
            (retain["image"], retain["mask"], sr, retain.get("key")),
            (forget["image"], forget["mask"], sf if pure is None else pure, forget.get("key"))])
        if reference:
            f_target = _map(lambda r, f: gaussian_like(f, torch.cat([r.flatten(), f.flatten()])), r_target, f_teacher)
        else:
            f_target = _map(lambda t: gaussian_like(t, t), f_teacher)
        r_emb, f_emb = student_outputs(student, teacher, "embed", [(retain["image"], retain["mask"], sr),
                                                                  (forget["image"], forget["mask"], sf)])
        return self.mse_terms(r_emb, r_target, f_emb, f_target)


class MaxLoss(UnlearningMethod):
    """Full model, gradient ascent on forget: task loss on D_R minus alpha * task loss on D_F.

    ``reference``: per-row task losses (``row_losses``) reduced over the mixed batch: MAGE's cross-entropy sums
    over the mixed batch's masked tokens, Palette's noise MSE with sign -1 on the forget rows."""

    def loss(self, student, teacher, forget, retain):
        xr, mr, xf, mf = retain["image"], retain["mask"], forget["image"], forget["mask"]
        if self.construction == "reference":
            r, f = mixed_terms(student.row_losses(xr, mr), student.row_losses(xf, mf))
        else:
            r, f = student.task_loss(xr, mr), student.task_loss(xf, mf)
        return {"loss": r - self.alpha * f, "retain": r, "forget": f}


class NoisyLabel(UnlearningMethod):
    """Full model: forget targets are the task targets of a noise image.

    ``reference`` (``method.noise`` does not apply): where the family has a pure-noise state (diffusion, as the
    public Palette code) the forget input holds pure noise in the hole and the target stays that noise; else
    the forget targets are drawn from N(mean, std^2) of the mixed batch's targets (``noise_target``: MAGE's
    random token ids; for pixels, MAE, the same construction). Per-row task losses reduced over the mixed batch."""

    def loss(self, student, teacher, forget, retain):
        xr, mr, xf, mf = retain["image"], retain["mask"], forget["image"], forget["mask"]
        if self.construction == "paper":
            r = student.task_loss(xr, mr)
            noisy_target = student.target_of(self.noise_like(xf))
            return self.combine(r, student.task_loss(xf, mf, target=noisy_target))
        sr, sf = draw_state(student, retain), draw_state(student, forget)
        pure = student.pure_noise_state(sf)
        r_target = student.target_of(xr)
        if pure is None:
            targets = student.noise_target(torch.cat([r_target, student.target_of(xf)]))[xr.shape[0]:]
            f_rows = student.row_losses(xf, mf, target=targets, state=sf)
        else:
            f_rows = student.row_losses(xf, mf, state=pure)
        return self.combine(*mixed_terms(student.row_losses(xr, mr, target=r_target, state=sr), f_rows))


class RetainLabel(UnlearningMethod):
    """Full model: distil D_R to the original's outputs; D_F targets = original outputs of
    *other* (retain) images of the batch under the forget mask.

    ``reference``: MSE of the raw outputs over the whole image (``raw_output``: MAGE's full logits, Palette's
    noise estimate; MAE's pixels), retain rows against the original's outputs of themselves, forget rows against
    those of the batch's retain rows tiled; reduced over the mixed batch. The released MAGE baseline code
    weights both terms by (1 + label), so its forget term never reaches a forget row; here it does (the fix)."""

    def loss(self, student, teacher, forget, retain):
        xr, mr, xf, mf = retain["image"], retain["mask"], forget["image"], forget["mask"]
        sr, sf = draw_state(student, retain), draw_state(student, forget)
        idx = torch.arange(xf.shape[0], device=xr.device) % xr.shape[0]
        keys = retain.get("key")
        if self.construction == "reference":
            (r_target,) = teacher_outputs(teacher, "raw_output", [(xr, mr, sr, keys)])
            r_out, f_out = student_outputs(student, teacher, "raw_output", [(xr, mr, sr), (xf, mf, sf)])
            return self.mse_terms(r_out, r_target, f_out, r_target[idx])
        other_keys = None if keys is None else [keys[i % len(keys)] for i in range(xf.shape[0])]
        r_target, f_target = teacher_outputs(teacher, "predict", [
            (xr, mr, sr, keys), (xr[idx], mf, sf, other_keys)])
        r = student.task_loss(xr, mr, target=r_target, state=sr)
        f = student.task_loss(xf, mf, target=f_target, state=sf)
        return self.combine(r, f)


class Finetune(UnlearningMethod):
    """Reference: continue training the full model on D_R only (one construction: the public code has none)."""

    needs_forget = False
    family_training = True  # the family's own training on D_R: a runner may run it with the family's own step

    def loss(self, student, teacher, forget, retain):
        r = student.task_loss(retain["image"], retain["mask"])
        return {"loss": r, "retain": r}
