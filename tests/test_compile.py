"""``model.compile``: training runs through torch.compile, checkpoints and generation do not see it."""

from __future__ import annotations

import lightning as L
import torch
from torch._dynamo.utils import counters

from nanogpt_pl.data import CharDataModule
from nanogpt_pl.module import GPTModule
from nanogpt_pl.model import GPTConfig


def test_compiled_training_keeps_plain_checkpoints_and_generation(small_text, tmp_path):
    L.seed_everything(0)
    dm = CharDataModule(str(small_text), block_size=8, batch_size=4, eval_iters=2)
    config = GPTConfig(vocab_size=dm.vocab_size, block_size=8, n_embd=16, n_head=2, n_layer=1)
    module = GPTModule(config, compile=True)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, val_check_interval=2, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 3
    assert isinstance(module.step_model, torch._dynamo.eval_frame.OptimizedModule)
    assert module.step_model is module.step_model  # compiled once, reused by every step

    # The checkpoint holds the plain model's keys and loads into an uncompiled module.
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["state_dict"]
    assert not [key for key in state if "_orig_mod" in key]
    plain = GPTModule.load_from_checkpoint(path)
    assert plain.step_model is plain.model

    # Same weights, same numbers: the compiled model computes what the plain one does.
    x, y = dm.sample("train", 1, torch.Generator().manual_seed(1))
    torch.testing.assert_close(module.step_model(x, y)[1], plain.model(x, y)[1], atol=1e-5, rtol=1e-5)

    # Generation goes through the plain module: no new graph is compiled.
    graphs = counters["stats"]["unique_graphs"]
    module.model.generate(x[:1, :3], max_new_tokens=6)
    assert counters["stats"]["unique_graphs"] == graphs


def test_compile_is_off_by_default():
    module = GPTModule(GPTConfig(vocab_size=10, block_size=4, n_embd=8, n_head=2, n_layer=1))
    assert module.step_model is module.model
