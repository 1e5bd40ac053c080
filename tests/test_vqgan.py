"""The VQ-GAN family honours the family contract: tokenizer, MaskGIT restore, targets, frozen parts."""

import json

import lightning as L
import pytest
import torch
from conftest import plain_fit, run_method_steps
from torch.utils.data import DataLoader

from i2i_unlearning.data.degrade import center_mask, outpaint_mask, random_patch_mask
from i2i_unlearning.errors import ConfigError
from i2i_unlearning.families.base import StageContext
from i2i_unlearning.families.vqgan import VQGAN, psnr
from i2i_unlearning.unlearning import methods as M

SIZE = 32


def tiny(**kw) -> VQGAN:
    torch.manual_seed(0)
    args = dict(image_size=SIZE, channels=1, tokenizer_channels=(8, 8, 8), latent_channels=8, codebook_size=32,
                codebook_dim=8, norm_groups=4, embed_dim=32, depth=1, num_heads=2, decoder_dim=32,
                decoder_depth=1, decoder_heads=2, dropout=0.0, decode_steps=3,
                train={"batch_size": 16, "tokenizer_steps": 40, "tokenizer_lr": 3e-3})
    return VQGAN(**{**args, **kw})


def blocks(n: int, seed: int) -> torch.Tensor:
    """Simple synthetic images: two bright rectangles on a dark background."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((n, 1, SIZE, SIZE), 0.1)
    for i in range(n):
        for _ in range(2):
            top, left = torch.randint(0, SIZE - 8, (2,), generator=g).tolist()
            h, w = torch.randint(6, 16, (2,), generator=g).tolist()
            x[i, :, top:top + h, left:left + w] = 0.5 + 0.5 * torch.rand((), generator=g)
    return x


class Blocks(L.LightningDataModule):
    """``steps`` training batches of block images (stream "train")."""

    def __init__(self, steps: int, batch_size: int) -> None:
        super().__init__()
        self.steps, self.batch_size = steps, batch_size

    def train_dataloader(self):
        batches = [{"train": {"image": blocks(self.batch_size, 100 + i)}} for i in range(self.steps)]
        return DataLoader(batches, batch_size=None)


def context(tmp_path, seed=0) -> StageContext:
    def eval_batches(split):
        yield {"image": blocks(32, seed), "mask": None, "label": torch.zeros(32, dtype=torch.long)}

    return StageContext(train_data=Blocks, fit=lambda module, data, name: plain_fit()(module, data),
                        eval_batches=eval_batches, workdir=tmp_path, scorer=None, seed=seed)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny VQ-GAN whose tokenizer went through ``pre_train`` (cached in a tmp work dir)."""
    workdir = tmp_path_factory.mktemp("tok")
    m = tiny()
    record = m.pre_train(context(workdir))
    return m, record, workdir


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(1)
    forget = {"image": blocks(8, 1), "mask": random_patch_mask(8, SIZE, 4, (0.5, 0.5), generator=g)}
    retain = {"image": blocks(8, 2), "mask": random_patch_mask(8, SIZE, 4, (0.5, 0.5), generator=g)}
    return forget, retain


def run_steps(model, method, forget, retain, steps=3, lr=3e-3):
    return run_method_steps(model, method, forget, retain, steps, lr)


def changed_params(module) -> set[str]:
    return {n for (n, p), (_, q) in zip(module.student.named_parameters(), module.teacher.named_parameters(),
                                        strict=True) if not torch.equal(p, q)}


# ---- tokenizer ----------------------------------------------------------------------------------
def test_tokenizer_round_trip_shapes_and_quality_floor(trained):
    m, record, _ = trained
    x = blocks(6, 7)
    ids = m.tokenize(x)
    assert ids.shape == (6, (SIZE // 4) ** 2) and ids.dtype == torch.long
    assert 0 <= ids.min() and ids.max() < m.codebook_size
    recon = m.detokenize(ids)
    assert recon.shape == x.shape and recon.min() >= 0 and recon.max() <= 1
    flat = psnr(x.mean(0, keepdim=True).expand_as(x), x).mean()  # the best constant-per-pixel guess
    assert psnr(recon, x).mean() > flat + 3
    assert record["tokenizer_psnr"] > flat + 3 and record["tokenizer_codes_used"] > 4
    assert "tokenizer_fid" not in record  # no feature net in this context


def test_tokenizer_is_cached_frozen_and_in_the_state_dict(trained):
    m, record, workdir = trained
    assert not list(m.tokenizer.parameters()), "the tokenizer must not be trainable"
    assert not m.train().tokenizer.training and m.blocks.training
    assert any(k.startswith("tokenizer.") for k in m.state_dict())
    assert json.loads((workdir / "tokenizer.json").read_text())["metrics"] == record
    fresh = tiny()
    ctx = context(workdir)
    ctx.fit = None  # a cached tokenizer is loaded, never retrained
    assert fresh.pre_train(ctx) == record
    assert all(torch.equal(a, b) for a, b in zip(fresh.tokenizer.state_dict().values(),
                                                 m.tokenizer.state_dict().values(), strict=True))


@pytest.mark.parametrize("name", ["ours", "max_loss", "noisy_label", "retain_label"])
def test_tokenizer_stays_bit_identical_through_unlearning(trained, batches, name):
    m, _, _ = trained
    method = {"ours": M.Ours, "max_loss": M.MaxLoss, "noisy_label": M.NoisyLabel,
              "retain_label": M.RetainLabel}[name](name)
    module = run_steps(m, method, *batches)
    assert changed_params(module), "nothing was trained"
    before, after = m.tokenizer.state_dict(), module.student.tokenizer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_frozen_tokenizer_is_not_in_the_optimiser():
    m = tiny()
    opt = m.configure_optimizers()["optimizer"]
    in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
    assert in_opt == {id(p) for p in m.parameters()}
    assert not any(id(b) in in_opt for b in m.tokenizer.buffers())


# ---- restore ------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: center_mask(SIZE, 0.5), lambda: outpaint_mask(SIZE, 0.5)])
def test_restore_changes_only_the_widened_hole_and_keeps_known_pixels(trained, make, monkeypatch):
    m, _, _ = trained
    m = m.eval()
    x = blocks(3, 11)
    mask = make().expand(3, -1, -1, -1)
    seen, decode = {}, m.detokenize

    def spy(ids):
        seen["ids"] = ids
        return decode(ids)

    monkeypatch.setattr(m, "detokenize", spy)
    out = m.restore(x, mask, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert torch.equal(out * (1 - mask), x * (1 - mask))
    assert not torch.equal(out * mask, x * mask)
    widened = m.token_missing(mask, margin=1)
    assert widened.sum() > m.token_missing(mask).sum()  # the hole grew by a token
    given = m.tokenize(x * (1 - mask) + 0.5 * mask)
    assert torch.equal(seen["ids"][~widened], given[~widened])  # kept tokens are never resampled


def test_restore_is_deterministic_for_a_seed(trained):
    m, _, _ = trained
    m = m.eval()
    x = blocks(4, 12)
    mask = center_mask(SIZE, 0.5).expand(4, -1, -1, -1)

    def run(seed):
        return m.restore(x, mask, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))  # control: the seed matters


# ---- encoder / decoder split ------------------------------------------------------------------------
def test_encoder_decoder_split_covers_every_parameter_once():
    m = tiny()
    enc = m.encoder_parameter_names()
    names = {n for n, _ in m.named_parameters()}
    assert enc and enc < names
    assert enc == {n for n in names if n.startswith(("token_emb", "pos_embed", "cls_token", "blocks", "norm"))}
    assert "head_out.weight" in names - enc
    assert len(list(m.encoder_parameters())) + len(list(m.decoder_parameters())) == len(names)


def test_embedding_is_kept_tokens_and_never_sees_the_hole():
    m, x = tiny().eval(), blocks(2, 3)
    mask = center_mask(SIZE, 0.5).expand(2, -1, -1, -1)
    y = x.clone()
    y[mask.bool()] = torch.rand(int(mask.sum()))
    assert torch.equal(m.embed(x, mask), m.embed(y, mask))
    assert m.embed(x, mask).shape == (2, 1 + 64 - 16, 32)  # CLS + kept of 8x8 tokens (4x4 hole)


@pytest.mark.parametrize("name", ["ours", "random_encoder"])
def test_encoder_only_methods_leave_the_untied_decoder_bit_identical(batches, name):
    m = tiny()
    module = run_steps(m, {"ours": M.Ours, "random_encoder": M.RandomEncoder}[name](name), *batches)
    changed = changed_params(module)
    assert changed and changed <= m.encoder_parameter_names()
    s, t = module.student, module.teacher
    assert all(torch.equal(p, q) for p, q in zip(s.decoder_parameters(), t.decoder_parameters(), strict=True))
    assert torch.equal(s.head_out.weight, t.head_out.weight)


def test_tied_head_is_an_encoder_weight_so_encoder_only_methods_move_the_head(batches):
    m = tiny(tie_head=True)
    assert m.head_out.weight is m.token_emb.weight
    names = {n for n, _ in m.named_parameters()}
    assert "token_emb.weight" in m.encoder_parameter_names() and "head_out.weight" not in names
    module = run_steps(m, M.Ours("ours"), *batches)
    assert "token_emb.weight" in changed_params(module) <= m.encoder_parameter_names()
    s, t = module.student, module.teacher
    assert s.head_out.weight is s.token_emb.weight
    assert not torch.equal(s.head_out.weight, t.head_out.weight)  # "frozen decoder" is only approximately so
    assert all(torch.equal(p, q) for p, q in zip(s.decoder_parameters(), t.decoder_parameters(), strict=True))


# ---- task loss and targets ----------------------------------------------------------------------------
def test_task_loss_takes_hard_ids_and_soft_logits_on_missing_tokens_only(batches):
    m = tiny(label_smoothing=0.0).eval()
    forget, retain = batches
    x, mask = forget["image"], forget["mask"]
    ids = m.target_of(x)
    assert ids.shape == (8, 64) and ids.dtype == torch.long
    assert torch.equal(m.task_loss(x, mask), m.task_loss(x, mask, target=ids))
    noisy = m.target_of(torch.rand_like(x))  # noisy_label's hard target
    soft = m.predict(retain["image"], mask).detach()  # retain_label's soft target
    assert soft.shape == (8, 64, 32) and soft.dtype == torch.float32
    for target in (noisy, soft):
        loss = m.task_loss(x, mask, target=target)
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
        assert m.head_out.weight.grad is not None
        m.zero_grad()
    peaked = torch.nn.functional.one_hot(ids, 32).float() * 1e4  # soft target = the ids, as logits
    assert m.task_loss(x, mask, target=peaked).item() == pytest.approx(m.task_loss(x, mask).item(), rel=1e-5)
    missing = m.token_missing(mask)
    off_hole = torch.where(missing, ids, (ids + 1) % 32)  # changes only kept tokens' targets
    assert torch.equal(m.task_loss(x, mask, target=off_hole), m.task_loss(x, mask, target=ids))
    with pytest.raises(ConfigError, match="target of shape"):
        m.task_loss(x, mask, target=ids.float())


def test_training_reduces_task_loss():
    m = tiny()
    x = blocks(16, 5)
    opt = torch.optim.Adam(m.parameters(), 3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        loss = m.task_loss(x, random_patch_mask(16, SIZE, 4, (0.5, 0.5), generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])


def test_bad_geometry_fails_with_named_input():
    with pytest.raises(ConfigError, match="image_size=30.*token size 4"):
        tiny(image_size=30)
    with pytest.raises(ConfigError, match="norm_groups"):
        tiny(norm_groups=3)
    m = tiny()
    uneven = torch.zeros(2, 1, SIZE, SIZE)
    uneven[0, :, :4, :4] = 1
    with pytest.raises(ConfigError, match="same number of kept tokens"):
        m.embed(blocks(2, 0), uneven)
