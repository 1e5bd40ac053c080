"""``method.construction=reference``: every method's loss is the public code's (the paper's released MAGE and
Palette code), checked against independent re-implementations of those formulas written here from the facts:
one mixed batch (retain rows, then forget rows) with labels +1 / -1, per-sample label weights and whole-batch
means. Loss value and gradient agree to a relative 1e-5 under identical random draws; ``paper`` differs where
the public code does; and the switch runs end to end on every family."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_cfg, prepared_runner, tiny_overrides
from test_diffusion import tiny as tiny_diffusion
from test_methods import tiny_mae
from test_vqgan import tiny as tiny_vqgan

from i2i_unlearning.data.degrade import random_block_mask, random_patch_mask
from i2i_unlearning.errors import ConfigError
from i2i_unlearning.families.diffusion import Diffusion
from i2i_unlearning.families.vqgan import VQGAN
from i2i_unlearning.unlearning import methods as M
from i2i_unlearning.validation import check_values

N_R, N_F = 6, 4  # unequal retain / forget rows: the mixed-batch shares matter
ALPHA = 0.3
METHODS = {"ours": M.Ours, "random_encoder": M.RandomEncoder, "max_loss": M.MaxLoss,
           "noisy_label": M.NoisyLabel, "retain_label": M.RetainLabel}


# ---- tiny families (the existing tests' sizes) and batches ---------------------------------------------------------
FAMILIES = {"mae": (tiny_mae, 16), "vqgan": (tiny_vqgan, 32), "diffusion": (tiny_diffusion, 16)}


def split(n: int, size: int, family: str, level: float, g: torch.Generator) -> dict:
    """``n`` images around brightness ``level`` with training masks of the family's kind."""
    image = (level + 0.3 * torch.rand(n, 1, size, size, generator=g)).clamp(0, 1)
    if family == "diffusion":
        mask = random_block_mask(n, size, 4, generator=g)
    else:
        mask = random_patch_mask(n, size, 4, (0.5, 0.5), generator=g)
    return {"image": image, "mask": mask}


def models_and_batches(family: str) -> tuple:
    """(family name, student, teacher, forget, retain): the student is the teacher slightly perturbed."""
    make, size = FAMILIES[family]
    teacher = make().eval().requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return family, student, teacher, split(N_F, size, family, 0.5, g), split(N_R, size, family, 0.1, g)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def setup(request):
    return models_and_batches(request.param)


# ---- the public code's formulas, on one mixed batch ------------------------------------------------------------
class Mixed:
    """The mixed batch: retain rows first, then forget rows; labels +1 (retain) / -1 (forget)."""

    def __init__(self, forget: dict, retain: dict):
        self.x = torch.cat([retain["image"], forget["image"]])
        self.m = torch.cat([retain["mask"], forget["mask"]])
        self.y = torch.cat([torch.ones(N_R), -torch.ones(N_F)])
        self.w_r, self.w_f = (1 + self.y) / 2, (1 - self.y) / 2  # per-sample label weights

    def tiled(self, out: torch.Tensor) -> torch.Tensor:
        """Outputs of the retain rows tiled to the batch size (row i gets retain row i mod N_R)."""
        reps = math.ceil(len(self.y) / N_R)
        return out[self.y > 0].repeat(reps, *([1] * (out.dim() - 1)))[: len(self.y)]

    def per_sample(self, a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """MAGE: per-sample mean of squared errors, weighted by the label, then the batch mean."""
        return ((a - b).pow(2).flatten(1).mean(1) * w).mean()

    def whole(self, a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Palette: MSE over the whole batch tensor of label-weighted tensors."""
        shape = (-1,) + (1,) * (a.dim() - 1)
        return F.mse_loss(a * w.view(shape), b * w.view(shape))

    def over_masked(self, per_unit: torch.Tensor, masked: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """MAGE's task losses: label-weighted losses on masked units, over the mixed batch's masked units."""
        w = w.view((-1,) + (1,) * (per_unit.dim() - 1))
        return (per_unit * masked * w).sum() / masked.sum()

    def normal_noise(self, values: torch.Tensor) -> torch.Tensor:
        """N(mean, std^2) of all of ``values`` (one draw for the whole batch)."""
        return torch.randn(values.shape) * values.float().std() + values.float().mean()


def mage_reference(method: str, student, teacher, forget: dict, retain: dict) -> torch.Tensor:
    """The public MAGE code's losses (VQ-GAN), mapped to pixels for the MAE (no public code of its own)."""
    b = Mixed(forget, retain)
    x, m = b.x, b.m
    if method == "ours":
        noise = b.normal_noise(x).clamp(0, 1)
        latent = student.embed(x, m)
        guide, mis_guide = teacher.embed(x, m), teacher.embed(noise, m)
        return b.per_sample(latent, guide, b.w_r) + ALPHA * b.per_sample(latent, mis_guide, b.w_f)
    if method == "random_encoder":
        guide = teacher.embed(x, m)
        mis_guide = guide.clone()
        mis_guide[N_R:] = torch.randn_like(guide[N_R:]) * guide.std() + guide.mean()
        latent = student.embed(x, m)
        return b.per_sample(latent, guide, b.w_r) + ALPHA * b.per_sample(latent, mis_guide, b.w_f)
    if method == "retain_label":  # the forget term on the forget rows (the released code's (1 + y) bug fixed)
        out, t_out = student.predict(x, m), teacher.predict(x, m)
        return b.per_sample(out, t_out, b.w_r) + ALPHA * b.per_sample(out, b.tiled(t_out), b.w_f)
    gt = student.target_of(x)
    noisy = b.normal_noise(gt) if method == "noisy_label" else None
    if isinstance(student, VQGAN):
        logits = student.predict(x, m)
        masked = student.token_missing(m).float()

        def units(target):  # label-smoothed cross-entropy per token
            return F.cross_entropy(logits.flatten(0, 1), target.flatten(), label_smoothing=0.1,
                                   reduction="none").view(masked.shape)

        noisy = None if noisy is None else noisy.clamp(0, student.codebook_size - 1).round().long()
    else:  # MAE: squared error per patch (the MAE's token)
        pred, p = student.predict(x, m), student.patch_size
        masked = F.max_pool2d(m, p)

        def units(target):
            return F.avg_pool2d((pred - target).pow(2).mean(1, keepdim=True), p)

        noisy = None if noisy is None else noisy.clamp(0, 1)
    l_r = b.over_masked(units(gt), masked, b.w_r)
    if method == "max_loss":
        return l_r - ALPHA * b.over_masked(units(gt), masked, b.w_f)
    return l_r + ALPHA * b.over_masked(units(noisy), masked, b.w_f)


def palette_reference(method: str, student, teacher, forget: dict, retain: dict) -> torch.Tensor:
    """The public Palette code's losses: its q_sample with labels, feature maps and noise estimates."""
    b = Mixed(forget, retain)
    m = b.m
    s_r, s_f = student.sample_state(retain["image"], retain["mask"]), student.sample_state(forget["image"],
                                                                                           forget["mask"])
    t, eps = torch.cat([s_r.t, s_f.t]), torch.cat([s_r.noise, s_f.noise])
    y0, gamma, y = 2 * b.x - 1, student.alphas_cumprod[t].view(-1, 1, 1, 1), b.y.view(-1, 1, 1, 1)
    y_original = gamma.sqrt() * y0 + (1 - gamma).sqrt() * eps
    y_noisy = (gamma.sqrt() * y0 * (y + 1) * 0.5 + (1 - gamma).sqrt() * eps
               + (1 - (1 - gamma).sqrt()) * eps * (1 - y) * 0.5)  # pure eps on forget rows

    def net_input(y_t):  # [noisy target with the known region kept, condition, mask]
        return torch.cat([y_t * m + (1 - m) * y0, y0 * (1 - m), m], dim=1)

    def features(model, y_t):
        skips, mid = model._encode(net_input(y_t), model._time(t, y_t.dtype))
        return [*skips, mid]

    def eps_hat(model, y_t):
        return model.unet(net_input(y_t), t).sample

    if method in ("ours", "random_encoder"):
        teacher_feat = features(teacher, y_noisy)
        forget_feat = teacher_feat
        if method == "random_encoder":  # whole-batch statistics per map (the draw: forget rows, as the method's)
            forget_feat = [torch.cat([f[:N_R], torch.randn_like(f[N_R:]) * f.std() + f.mean()]) for f in teacher_feat]
        return sum(b.whole(s, t_r, b.w_r) + ALPHA * b.whole(s, t_f, b.w_f)
                   for s, t_r, t_f in zip(features(student, y_original), teacher_feat, forget_feat, strict=True))
    if method == "retain_label":
        out, t_out = eps_hat(student, y_original), eps_hat(teacher, y_original)
        return b.whole(out, t_out, b.w_r) + ALPHA * b.whole(out, b.tiled(t_out), b.w_f)
    out = eps_hat(student, y_noisy if method == "noisy_label" else y_original)
    sign = -1.0 if method == "max_loss" else 1.0
    return b.whole(m * eps, m * out, b.w_r) + sign * ALPHA * b.whole(m * eps, m * out, b.w_f)


def public_code_loss(method: str, student, teacher, forget: dict, retain: dict) -> torch.Tensor:
    reference = palette_reference if isinstance(student, Diffusion) else mage_reference
    return reference(method, student, teacher, forget, retain)


def value_and_grad(loss_fn, params: list, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss and its gradient (flat) w.r.t. ``params``, after seeding torch with ``seed``."""
    torch.manual_seed(seed)
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.detach(), torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                                     for g, p in zip(grads, params, strict=True)])


def method(name: str, construction: str = "reference", **kw) -> M.UnlearningMethod:
    return METHODS[name](name, alpha=ALPHA, noise="normal", construction=construction, **kw)


# ---- reference == the public code's formula ---------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(METHODS))
def test_reference_loss_and_gradient_equal_the_public_codes_formula(setup, name):
    family, student, teacher, forget, retain = setup
    unlearn = method(name)
    params = unlearn.trainable_parameters(student)
    ours, g_ours = value_and_grad(lambda: unlearn.loss(student, teacher, forget, retain)["loss"], params, 3)
    theirs, g_theirs = value_and_grad(lambda: public_code_loss(name, student, teacher, forget, retain), params, 3)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=0)
    assert g_theirs.abs().max() > 0
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-5, atol=1e-5 * g_theirs.abs().max().item())
    if name in ("ours", "random_encoder", "noisy_label") or family == "diffusion":
        with torch.no_grad():  # control: the loss draws, so equal draws were needed (another seed, another value)
            torch.manual_seed(4)
            assert not torch.allclose(public_code_loss(name, student, teacher, forget, retain), theirs, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_paper_construction_differs_from_the_public_codes_formula(setup, name):
    """Control: the two constructions are told apart by the formula above (reductions, targets, statistics)."""
    _, student, teacher, forget, retain = setup
    with torch.no_grad():
        torch.manual_seed(3)
        paper = method(name, "paper").loss(student, teacher, forget, retain)["loss"]
        torch.manual_seed(3)
        theirs = public_code_loss(name, student, teacher, forget, retain)
    assert not torch.allclose(paper, theirs, rtol=1e-3)


def test_diffusion_ours_forget_target_is_the_teachers_view_of_pure_noise_in_the_forget_hole():
    """Same reduction, other target: the public code's teacher sees the forget image's context and pure noise in
    the hole, not a noise image (the paper's figure); the per-row distances differ."""
    _, student, teacher, forget, retain = models_and_batches("diffusion")
    with torch.no_grad():
        torch.manual_seed(5)
        paper = method("ours", "paper").loss(student, teacher, forget, retain)["forget"]
        torch.manual_seed(5)
        reference = method("ours").loss(student, teacher, forget, retain)["forget"]
        torch.manual_seed(5)
        student.sample_state(retain["image"], retain["mask"])
        state = student.sample_state(forget["image"], forget["mask"])
        pure = teacher.embed(forget["image"], forget["mask"], state=student.pure_noise_state(state))
        s_emb = student.embed(forget["image"], forget["mask"], state=state)
    assert torch.allclose(reference, M.row_mse(s_emb, pure).sum() / (N_R + N_F), rtol=1e-5)
    assert not torch.allclose(paper * N_F / (N_R + N_F), reference, rtol=0.05)  # paper's term, same reduction
    # the hook: x_t is the noise itself in the hole, the standard input outside it and in the condition
    x = teacher._input(forget["image"], forget["mask"], forget["image"], teacher.pure_noise_state(state))
    plain = teacher._input(forget["image"], forget["mask"], forget["image"], state)
    hole = forget["mask"].bool()
    assert torch.equal(x[:, :1][hole], state.noise[hole])
    assert torch.equal(x[:, :1][~hole], plain[:, :1][~hole]) and torch.equal(x[:, 1:], plain[:, 1:])


def test_reference_noise_image_has_the_statistics_of_the_whole_mixed_batch():
    """``constant`` noise (deterministic): the batch mean of forget + retain under reference, of forget under paper."""
    forget = {"image": torch.full((N_F, 1, 16, 16), 0.8), "mask": torch.ones(N_F, 1, 16, 16)}
    retain = {"image": torch.full((N_R, 1, 16, 16), 0.2), "mask": torch.ones(N_R, 1, 16, 16)}
    family = tiny_mae()
    for construction, level in (("paper", 0.8), ("reference", (0.8 * N_F + 0.2 * N_R) / (N_F + N_R))):
        noise, *_ = M.Ours("ours", noise="constant", construction=construction).noise_request(
            family, forget, retain, None)
        assert noise.shape == forget["image"].shape
        torch.testing.assert_close(noise, torch.full_like(noise, level))


def test_unknown_construction_fails_fast_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"method.construction='public'.*\['paper', 'reference'\]"):
        M.Ours("ours", construction="public")
    cfg = compose_cfg(tiny_overrides(tmp_path, "mae", "noisy_label", extra=["method.construction=public"]))
    with pytest.raises(ConfigError, match=r"method.construction='public'.*\['paper', 'reference'\]"):
        check_values(cfg)


# ---- end to end: one short run per family -----------------------------------------------------------------------
@pytest.mark.parametrize(("model", "name"), [("mae", "retain_label"), ("vqgan", "noisy_label"), ("diffusion", "ours")])
def test_reference_construction_trains_end_to_end(shared_tmp, model, name):
    cfg = compose_cfg(tiny_overrides(shared_tmp, model, name, extra=["method.construction=reference"]))
    runner = prepared_runner(cfg, shared_tmp / f"construction-{model}-{name}")
    runner.load_references()
    assert runner.method.construction == "reference"
    losses, loss = [], runner.method.loss

    def spy(*args):
        out = loss(*args)
        losses.append(out["loss"].item())
        return out

    runner.method.loss = spy
    student = runner.unlearn()[0]
    original = runner.refs["original"][0]
    assert len(losses) == cfg.method.steps and all(math.isfinite(v) for v in losses)
    assert any(not torch.equal(p, q) for p, q in zip(student.parameters(), original.parameters(), strict=True))
