"""Each method's loss does what docs/algorithms.md says, on a tiny MAE and fixed tensors."""

import pytest
import torch
from conftest import run_method_steps

from i2i_unlearning.data.degrade import random_patch_mask
from i2i_unlearning.families.mae import MAE
from i2i_unlearning.unlearning import methods as M
from i2i_unlearning.unlearning.module import UnlearnModule

TRAINING = {
    "ours": M.Ours, "random_encoder": M.RandomEncoder, "max_loss": M.MaxLoss,
    "noisy_label": M.NoisyLabel, "retain_label": M.RetainLabel, "finetune": M.Finetune,
}


def tiny_mae() -> MAE:
    torch.manual_seed(0)
    return MAE(image_size=16, channels=1, patch_size=4, embed_dim=32, depth=2, num_heads=2,
               decoder_dim=16, decoder_depth=1, decoder_heads=1)


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(1)
    yy, xx = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    forget_img = ((xx // 2) % 2).float()[None, None].expand(8, 1, 16, 16)  # stripes
    retain_img = ((yy // 4) % 2).float()[None, None].expand(8, 1, 16, 16)
    forget = {"image": (forget_img + 0.1 * torch.rand(8, 1, 16, 16, generator=g)).clamp(0, 1),
              "mask": random_patch_mask(8, 16, 4, (0.5, 0.5), generator=g)}
    retain = {"image": (retain_img + 0.1 * torch.rand(8, 1, 16, 16, generator=g)).clamp(0, 1),
              "mask": random_patch_mask(8, 16, 4, (0.5, 0.5), generator=g)}
    return forget, retain


def run_steps(method, forget, retain, steps=15, lr=3e-3):
    return run_method_steps(tiny_mae(), method, forget, retain, steps, lr)


def dist(a, b):
    return (a - b).pow(2).mean().item()


def test_ours_moves_forget_embeddings_to_noise_embeddings_and_keeps_retain(batches):
    forget, retain = batches
    method = M.Ours("ours", alpha=1.0)
    module = run_steps(method, forget, retain)
    s, t = module.student.eval(), module.teacher
    with torch.no_grad():
        torch.manual_seed(5)
        noise = method.noise_like(forget["image"])
        f_s, f_t = s.embed(forget["image"], forget["mask"]), t.embed(forget["image"], forget["mask"])
        f_noise = t.embed(noise, forget["mask"])
        r_s, r_t = s.embed(retain["image"], retain["mask"]), t.embed(retain["image"], retain["mask"])
    start = dist(f_t, f_noise)  # the student starts as the teacher
    assert dist(f_s, f_noise) < 0.7 * start, "forget embeddings did not move toward E0(noise)"
    assert dist(f_s, f_t) > 0.1 * start, "forget embeddings stayed at the original's"
    assert dist(r_s, r_t) < 0.25 * dist(f_s, f_t), "retain embeddings drifted as much as forget ones"


def test_random_encoder_moves_forget_embeddings_away(batches):
    forget, retain = batches
    module = run_steps(M.RandomEncoder("random_encoder", alpha=1.0), forget, retain)
    with torch.no_grad():
        f_s = module.student.embed(forget["image"], forget["mask"])
        f_t = module.teacher.embed(forget["image"], forget["mask"])
        r_s = module.student.embed(retain["image"], retain["mask"])
        r_t = module.teacher.embed(retain["image"], retain["mask"])
    assert dist(f_s, f_t) > 2 * dist(r_s, r_t)
    # the embedding is pushed toward an uncorrelated Gaussian: its correlation with E0's drops
    corr = torch.corrcoef(torch.stack([f_s.flatten(), f_t.flatten()]))[0, 1]
    assert corr < 0.95


def test_max_loss_ascends_on_forget(batches):
    forget, retain = batches
    before = tiny_mae().task_loss(forget["image"], forget["mask"]).item()
    module = run_steps(M.MaxLoss("max_loss", alpha=1.0), forget, retain, steps=10)
    after = module.student.task_loss(forget["image"], forget["mask"]).item()
    assert after > 2 * before


def test_noisy_label_moves_forget_outputs_toward_noise(batches):
    forget, retain = batches
    module = run_steps(M.NoisyLabel("noisy_label", alpha=1.0), forget, retain, steps=30)
    with torch.no_grad():
        pred_s = module.student.predict(forget["image"], forget["mask"])
        pred_t = module.teacher.predict(forget["image"], forget["mask"])
    m = forget["mask"].bool()
    # noise targets are i.i.d. around the batch mean: the hole's prediction loses its stripe structure
    assert pred_s[m].std() < pred_t[m].std() or \
        dist(pred_s[m], forget["image"][m]) > dist(pred_t[m], forget["image"][m])
    assert dist(pred_s, pred_t) > 1e-4


def test_retain_label_moves_forget_outputs_toward_others_outputs(batches):
    forget, retain = batches
    module = run_steps(M.RetainLabel("retain_label", alpha=1.0), forget, retain, steps=30)
    with torch.no_grad():
        hole = forget["mask"].bool()  # the task loss (and so the target) covers the hole only
        target = module.teacher.predict(retain["image"], forget["mask"])[hole]
        before = dist(module.teacher.predict(forget["image"], forget["mask"])[hole], target)
        after = dist(module.student.predict(forget["image"], forget["mask"])[hole], target)
    assert after < 0.5 * before


def test_finetune_ignores_forget_batch(batches):
    forget, retain = batches
    out = M.Finetune("finetune").loss(tiny_mae(), tiny_mae(), None, retain)
    assert set(out) == {"loss", "retain"}


@pytest.mark.parametrize("name", ["ours", "random_encoder"])
def test_encoder_only_methods_leave_decoder_bit_identical(batches, name):
    forget, retain = batches
    module = run_steps(TRAINING[name](name), forget, retain, steps=3)
    enc = module.student.encoder_parameter_names()
    changed = {n for (n, p), (_, q) in zip(module.student.named_parameters(), module.teacher.named_parameters(),
                                           strict=True) if not torch.equal(p, q)}
    assert changed, "nothing was trained"
    assert changed <= enc, f"decoder parameters changed: {sorted(changed - enc)}"


@pytest.mark.parametrize("name", ["max_loss", "noisy_label", "retain_label", "finetune"])
def test_full_model_methods_train_the_decoder(batches, name):
    forget, retain = batches
    module = run_steps(TRAINING[name](name), forget, retain, steps=3)
    dec = [n for n, _ in module.student.named_parameters() if n not in module.student.encoder_parameter_names()]
    s, t = dict(module.student.named_parameters()), dict(module.teacher.named_parameters())
    assert any(not torch.equal(s[n], t[n]) for n in dec)


def test_teacher_stays_frozen_and_in_eval_mode(batches):
    forget, retain = batches
    module = UnlearnModule(tiny_mae(), M.Ours("ours"))
    module.train()
    assert not module.teacher.training and module.student.training
    assert not any(p.requires_grad for p in module.teacher.parameters())


def test_bad_method_configs_fail_fast():
    with pytest.raises(ValueError, match="retain_split"):
        M.Ours("ours", retain_split="forget_train")
    with pytest.raises(ValueError, match="steps"):
        M.Ours("ours", steps=0)
    with pytest.raises(ValueError, match="start_from"):
        M.Reference("x", start_from="somewhere")
