"""The diffusion family honours the family contract: UNet walk, training, sampling, encoder split,
and student/teacher seeing the same timestep and noise."""

import pytest
import torch
from conftest import run_method_steps

from i2i_unlearning.data.degrade import center_mask, outpaint_mask, random_block_mask
from i2i_unlearning.errors import ConfigError
from i2i_unlearning.families.diffusion import Diffusion, DiffusionState
from i2i_unlearning.unlearning import methods as M

SIZE = 16
ENCODER_ONLY = {"ours": M.Ours, "random_encoder": M.RandomEncoder}
FULL_MODEL = {"max_loss": M.MaxLoss, "noisy_label": M.NoisyLabel, "retain_label": M.RetainLabel}


def tiny(**kw) -> Diffusion:
    torch.manual_seed(0)
    args = dict(image_size=SIZE, channels=1, block_channels=(8, 16), attention=(False, True), norm_groups=4,
                attention_head_dim=4, sample_steps=3)
    return Diffusion(**{**args, **kw})


def images(n: int, seed: int, period: int) -> torch.Tensor:
    """Stripes of the given period plus a little noise, in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    xx = torch.arange(SIZE)[None, None, None, :].expand(n, 1, SIZE, SIZE)
    return (((xx // period) % 2).float() * 0.8 + 0.1 + 0.05 * torch.rand(n, 1, SIZE, SIZE, generator=g)).clamp(0, 1)


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(1)
    forget = {"image": images(8, 1, 2), "mask": random_block_mask(8, SIZE, 4, generator=g)}
    retain = {"image": images(8, 2, 4), "mask": random_block_mask(8, SIZE, 4, generator=g)}
    return forget, retain


def decoder_names(m: Diffusion) -> set[str]:
    return {n for n, _ in m.named_parameters() if n.startswith(("unet.up_blocks.", "unet.conv_norm_out.",
                                                               "unet.conv_out."))}


def changed(module) -> set[str]:
    return {n for (n, p), (_, q) in zip(module.student.named_parameters(), module.teacher.named_parameters(),
                                        strict=True) if not torch.equal(p, q)}


# ---- the UNet and its split ---------------------------------------------------------------------------
def test_encoder_decoder_walk_equals_the_diffusers_forward(batches):
    m = tiny().eval()
    x, mask = batches[0]["image"], batches[0]["mask"]
    state = m.sample_state(x, mask)
    inp = m._input(x, mask, x, state)
    with torch.no_grad():
        assert torch.equal(m._eps(inp, state.t), m.unet(inp, state.t).sample)


def test_feature_list_has_the_documented_shapes(batches):
    m = tiny()
    x, mask = batches[0]["image"], batches[0]["mask"]
    feats = m.embed(x, mask)
    # conv_in, level 0 (resnet, downsampler), level 1 (resnet + attention), mid block
    assert [tuple(f.shape) for f in feats] == [(8, 8, 16, 16), (8, 8, 16, 16), (8, 8, 8, 8), (8, 16, 8, 8),
                                               (8, 16, 8, 8)]
    default = Diffusion()  # the tiny preset of conf/model/diffusion.yaml: 7 maps
    masks = center_mask(32, 0.5).repeat(2, 1, 1, 1)
    shapes = [tuple(f.shape[1:]) for f in default.embed(torch.rand(2, 1, 32, 32), masks)]
    assert shapes == [(16, 32, 32), (16, 32, 32), (16, 16, 16), (32, 16, 16), (32, 8, 8), (64, 8, 8), (64, 8, 8)]


def test_encoder_owns_conv_in_down_and_mid_and_the_time_embedding_only_on_request():
    m, shared = tiny(), tiny(encoder_time_embedding=True)
    enc = m.encoder_parameter_names()
    assert enc and all(n.startswith(("unet.conv_in.", "unet.down_blocks.", "unet.mid_block.")) for n in enc)
    assert not enc & decoder_names(m)
    time = {n for n, _ in m.named_parameters() if n.startswith("unet.time_embedding.")}
    assert time and not time & enc
    assert shared.encoder_parameter_names() == enc | time
    assert set(dict(m.named_parameters())) == enc | time | decoder_names(m)  # nothing else has weights


# ---- training -----------------------------------------------------------------------------------------
def test_training_steps_lower_the_loss_on_a_fixed_batch(batches):
    m = tiny()
    x, mask = batches[1]["image"], batches[1]["mask"]
    torch.manual_seed(3)
    state = m.sample_state(x, mask)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    with torch.no_grad():
        before = m.task_loss(x, mask, state=state).item()
    for _ in range(30):
        loss = m.task_loss(x, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert m.task_loss(x, mask, state=state).item() < 0.7 * before


def test_task_loss_only_sees_the_hole_and_the_substituted_target(batches):
    m = tiny()
    x, mask = batches[0]["image"], batches[0]["mask"]
    state = m.sample_state(x, mask)
    with torch.no_grad():
        plain = m.task_loss(x, mask, state=state)
        assert torch.equal(plain, m.task_loss(x, mask, target=m.target_of(x), state=state))
        outside = x * (1 - mask) + torch.rand_like(x) * mask  # a target that differs only in the hole
        assert not torch.equal(plain, m.task_loss(x, mask, target=outside, state=state))
        inside = x * mask + torch.rand_like(x) * (1 - mask)  # ... and one that differs only outside it
        assert torch.equal(plain, m.task_loss(x, mask, target=inside, state=state))
    with pytest.raises(ConfigError, match="target of shape"):
        m.task_loss(x, mask, target=x[:, :, :8])


def test_predict_is_an_image_estimate_that_keeps_known_pixels(batches):
    m = tiny()
    x, mask = batches[0]["image"], batches[0]["mask"]
    with torch.no_grad():
        out = m.predict(x, mask)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert torch.equal(out * (1 - mask), x * (1 - mask))


# ---- sampling -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.parametrize("make", [lambda: center_mask(SIZE, 0.5), lambda: outpaint_mask(SIZE, 0.5)])
def test_sampling_keeps_known_pixels_and_is_deterministic_for_a_seed(batches, sampler, make):
    m = tiny(sampler=sampler).eval()
    x = batches[1]["image"][:4]
    mask = make().expand(4, -1, -1, -1)
    a = m.restore(x, mask, generator=torch.Generator().manual_seed(0))
    b = m.restore(x, mask, generator=torch.Generator().manual_seed(0))
    c = m.restore(x, mask, generator=torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a * (1 - mask), x * (1 - mask))
    assert torch.equal(a, b)
    assert not torch.equal(a * mask, c * mask)  # control: the seed matters


def test_bad_configs_fail_fast():
    with pytest.raises(ConfigError, match="model.attention"):
        tiny(attention=(True,))
    with pytest.raises(ConfigError, match="model.sample_steps"):
        tiny(sample_steps=2000)
    with pytest.raises(ConfigError, match="model.sampler"):
        tiny(sampler="euler")
    with pytest.raises(ConfigError, match="model.image_size"):
        tiny(image_size=15)


# ---- shared student / teacher randomness --------------------------------------------------------------
def test_state_fixes_the_noisy_input_and_is_drawn_once_per_batch(batches):
    m = tiny()
    x, mask = batches[0]["image"], batches[0]["mask"]
    state = m.sample_state(x, mask)
    assert isinstance(state, DiffusionState) and state.t.shape == (8,) and state.noise.shape == x.shape
    with torch.no_grad():
        a, b, c = m.embed(x, mask, state=state), m.embed(x, mask, state=state), m.embed(x, mask)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a, c, strict=True))  # control: a fresh draw differs
    with pytest.raises(ConfigError, match="sample_state"):
        m.embed(x[:4], mask[:4], state=state)


@pytest.mark.parametrize("name", sorted(ENCODER_ONLY))
def test_student_equal_to_teacher_matches_its_retain_targets_exactly(batches, name):
    """Methods draw one state per batch from the student and give it to both models, so a student
    equal to the teacher has a retain term of exactly zero (a fresh draw per call would not)."""
    out = ENCODER_ONLY[name](name).loss(tiny(), tiny(), *batches)
    assert out["retain"].item() == 0.0 and out["forget"].item() > 0.0


def spy_states(monkeypatch) -> list:
    """Record every state ``Diffusion.sample_state`` draws."""
    seen, draw = [], Diffusion.sample_state

    def spy(self, image, mask):
        seen.append(draw(self, image, mask))
        return seen[-1]

    monkeypatch.setattr(Diffusion, "sample_state", spy)
    return seen


def test_ours_forget_target_is_the_teachers_noise_embedding_under_the_same_state(batches, monkeypatch):
    forget, retain = batches
    student, teacher, method = tiny(), tiny(), M.Ours("ours")
    n = method.noise_like(forget["image"])
    monkeypatch.setattr(method, "noise_like", lambda image: n)
    seen = spy_states(monkeypatch)
    f = method.loss(student, teacher, forget, retain)["forget"]
    assert len(seen) == 2  # one state per batch, none drawn inside embed
    with torch.no_grad():
        expected = M.embedding_mse(student.embed(forget["image"], forget["mask"], state=seen[1]),
                                   teacher.embed(n, forget["mask"], state=seen[1]))
    assert torch.equal(f, expected)


def test_retain_label_predicts_and_trains_under_one_state_per_batch(batches, monkeypatch):
    forget, retain = batches
    student, teacher = tiny(), tiny()
    seen = spy_states(monkeypatch)
    out = M.RetainLabel("retain_label").loss(student, teacher, forget, retain)
    assert len(seen) == 2
    xr, mr, xf, mf = retain["image"], retain["mask"], forget["image"], forget["mask"]
    with torch.no_grad():
        r = student.task_loss(xr, mr, target=teacher.predict(xr, mr, state=seen[0]), state=seen[0])
        f = student.task_loss(xf, mf, target=teacher.predict(xr, mf, state=seen[1]), state=seen[1])
    assert torch.equal(out["retain"], r) and torch.equal(out["forget"], f)


# ---- what the methods train ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ENCODER_ONLY))
def test_encoder_only_methods_leave_up_blocks_head_and_time_embedding_bit_identical(batches, name):
    m = tiny()
    module = run_method_steps(m, ENCODER_ONLY[name](name), *batches)
    moved = changed(module)
    assert moved and moved <= m.encoder_parameter_names()
    assert not any(n.startswith(("unet.up_blocks.", "unet.conv_norm_out.", "unet.conv_out.",
                                 "unet.time_embedding.")) for n in moved)


def test_encoder_time_embedding_option_lets_ours_train_the_shared_time_embedding(batches):
    m = tiny(encoder_time_embedding=True)
    moved = changed(run_method_steps(m, M.Ours("ours"), *batches))
    assert any(n.startswith("unet.time_embedding.") for n in moved)
    assert not moved & decoder_names(m)


@pytest.mark.parametrize("name", sorted(FULL_MODEL))
def test_full_model_methods_train_the_decoder_with_a_finite_forget_term(batches, name):
    m = tiny()
    method = FULL_MODEL[name](name)
    module = run_method_steps(m, method, *batches)
    assert changed(module) & decoder_names(m)
    out = method.loss(module.student, module.teacher, *batches)
    assert torch.isfinite(out["forget"]) and torch.isfinite(out["retain"])


def test_noisy_label_teaches_the_noise_image_as_the_forget_output(batches):
    forget, retain = batches
    m = tiny()
    method = M.NoisyLabel("noisy_label", alpha=1.0)
    torch.manual_seed(11)
    n = method.noise_like(forget["image"])
    state = m.sample_state(forget["image"], forget["mask"])
    with torch.no_grad():
        before = m.task_loss(forget["image"], forget["mask"], target=n, state=state).item()
    module = run_method_steps(m, method, forget, retain, steps=10)
    with torch.no_grad():
        after = module.student.task_loss(forget["image"], forget["mask"], target=n, state=state).item()
    assert after < before
