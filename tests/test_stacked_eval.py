"""The stacked evaluation gives the lecture's estimate: the mean over eval_iters batches run one by one."""

from __future__ import annotations

import lightning as L
import torch

import nanogpt_pl.data
from nanogpt_pl.data import CharDataModule
from nanogpt_pl.model import GPTConfig
from nanogpt_pl.module import EVAL_TAGS, GPTModule


def test_stacked_estimate_equals_mean_of_per_batch_losses(small_text, monkeypatch):
    # Three batches per forward pass: eval_iters 7 becomes passes of 3, 3 and 1 batches per split,
    # so the weighting of unequal passes is exercised too.
    batch_size, block_size = 4, 8
    monkeypatch.setattr(nanogpt_pl.data, "EVAL_TOKENS_PER_FORWARD", 3 * batch_size * block_size)
    L.seed_everything(0)
    dm = CharDataModule(str(small_text), block_size=block_size, batch_size=batch_size, eval_iters=7)
    module = GPTModule(GPTConfig(vocab_size=dm.vocab_size, block_size=block_size, n_embd=16, n_head=2, n_layer=2))
    dm.setup("validate")
    assert [r.n_batches for r in dm._eval_requests()] == [3, 3, 1, 3, 3, 1]
    eval_stream = torch.Generator().set_state(dm._generators["eval"].get_state())

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    (stacked,) = trainer.validate(module, datamodule=dm, verbose=False)

    # The same blocks, drawn from a copy of the sampler's stream, run one batch at a time.
    module.model.eval()
    losses = {"train": [], "val": []}
    with torch.no_grad():
        for request in dm._eval_requests():
            x, y = dm.sample(request.split, request.n_batches, eval_stream)
            for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
                losses[request.split].append(module.model(xb, yb)[1])
    for split, tag in EVAL_TAGS.items():
        assert len(losses[split]) == 7
        per_batch = torch.stack(losses[split]).mean()
        torch.testing.assert_close(torch.tensor(stacked[tag]), per_batch, atol=1e-6, rtol=1e-6)
    # An unweighted mean over the three passes (ignoring their sizes) would not match: the test is sharp.
    val = losses["val"]
    per_pass = torch.stack([torch.stack(val[0:3]).mean(), torch.stack(val[3:6]).mean(), val[6]])
    assert abs(stacked["val/loss"] - per_pass.mean().item()) > 1e-5
