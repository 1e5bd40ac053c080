"""Helper script for test_ddp.py: a 2-process CPU DDP fit (gloo) of the unlearning step.

Usage: python tests/_ddp_fit.py DATA_DIR OUT_DIR. Every rank saves its student weights.
"""

import sys
from pathlib import Path

import lightning as L
import torch

from i2i_unlearning.data.datamodule import ForgetRetainDataModule
from i2i_unlearning.families.mae import MAE
from i2i_unlearning.unlearning.methods import Ours
from i2i_unlearning.unlearning.module import UnlearnModule


def main(data_dir: str, out_dir: str) -> None:
    L.seed_everything(0, verbose=False)
    family = MAE(image_size=32, channels=1, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                 decoder_dim=16, decoder_depth=1, decoder_heads=1)
    module = UnlearnModule(family, Ours("ours", steps=4, lr=1e-3, batch_size=8))
    dm = ForgetRetainDataModule(data_dir, streams={"forget": ["forget_train"], "retain": ["retain_train"]},
                                batch_size=8, epoch_batches=4, patch=4, seed=0)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=4, max_epochs=-1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, dm)
    out = Path(out_dir)
    torch.save({"world_size": trainer.world_size, "student": module.student.state_dict(),
                "teacher": module.teacher.state_dict()}, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:3])
