"""The MAE family honours the family contract."""

import pytest
import torch

from i2i_unlearning.data.degrade import center_mask, outpaint_mask, random_patch_mask
from i2i_unlearning.errors import ConfigError
from i2i_unlearning.families.mae import MAE


def tiny():
    torch.manual_seed(0)
    return MAE(image_size=16, channels=1, patch_size=4, embed_dim=32, depth=1, num_heads=2,
               decoder_dim=16, decoder_depth=1, decoder_heads=1)


def test_encoder_decoder_split_covers_every_parameter_once():
    m = tiny()
    enc = m.encoder_parameter_names()
    names = {n for n, _ in m.named_parameters()}
    assert enc and enc < names
    assert all(n.startswith(("patch_embed", "cls_token", "blocks", "norm")) for n in enc)
    assert len(list(m.encoder_parameters())) + len(list(m.decoder_parameters())) == len(names)


@pytest.mark.parametrize("make", [lambda: center_mask(16, 0.5), lambda: outpaint_mask(16, 0.5)])
def test_restore_keeps_known_pixels_and_fills_the_hole(make):
    m, x = tiny(), torch.rand(3, 1, 16, 16)
    mask = make().expand(3, -1, -1, -1)
    out = m.restore(x, mask)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert torch.equal(out * (1 - mask), x * (1 - mask))
    assert not torch.equal(out * mask, x * mask)


def test_embedding_never_sees_the_hole():
    m, x = tiny(), torch.rand(2, 1, 16, 16)
    mask = center_mask(16, 0.5).expand(2, -1, -1, -1)
    y = x.clone()
    y[mask.bool()] = torch.rand(int(mask.sum()))
    assert torch.allclose(m.embed(x, mask), m.embed(y, mask))
    assert m.embed(x, mask).shape == (2, 1 + 12, 32)  # CLS + 12 visible of 16 patches


def test_task_loss_uses_substituted_target_on_missing_patches_only():
    m, x = tiny(), torch.rand(4, 1, 16, 16)
    mask = random_patch_mask(4, 16, 4, (0.5, 0.5), generator=torch.Generator().manual_seed(0))
    pred = m.predict(x, mask).detach()
    assert m.task_loss(x, mask, target=pred).item() == pytest.approx(0.0, abs=1e-10)
    off_hole = pred * mask + torch.rand_like(pred) * (1 - mask)  # changes only known pixels
    assert m.task_loss(x, mask, target=off_hole).item() == pytest.approx(0.0, abs=1e-10)
    assert m.task_loss(x, mask).item() > 0


def test_training_reduces_task_loss():
    m = tiny()
    x = torch.rand(1, 1, 16, 16).expand(16, -1, -1, -1)
    opt = torch.optim.Adam(m.parameters(), 3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        loss = m.task_loss(x, random_patch_mask(16, 16, 4, (0.5, 0.5), generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])


def test_bad_geometry_fails_with_named_input():
    with pytest.raises(ConfigError, match="image_size=30.*patch_size=4"):
        MAE(image_size=30, patch_size=4)
    m = tiny()
    uneven = torch.zeros(2, 1, 16, 16)
    uneven[0, :, :4, :4] = 1
    with pytest.raises(ConfigError, match="same number of visible patches"):
        m.embed(torch.rand(2, 1, 16, 16), uneven)
