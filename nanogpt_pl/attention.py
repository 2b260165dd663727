"""Attention maps: which earlier characters each position attends to, per layer and head.

The weights come from the model's own forward (``GPT.attention_weights``); this module draws
them, for the ``attention`` command (a PNG from a checkpoint) and for TensorBoard during training.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from nanogpt_pl.data import CharTokenizer
from nanogpt_pl.errors import UsageError
from nanogpt_pl.run.files import write_atomic
from nanogpt_pl.generate import load_checkpoint
from nanogpt_pl.model import GPT

ATTENTION_TAG = "attention"

# Characters a tick label could not show: a newline, and a space (invisible on its own).
_VISIBLE = {"\n": "\\n", " ": "␣", "\t": "\\t"}


def prompt_weights(model: GPT, tokenizer: CharTokenizer, prompt: str) -> torch.Tensor:
    """Attention weights (n_layer, n_head, T, T) over ``prompt``'s characters; one-line errors."""
    if model.config.bigram:
        raise UsageError("this checkpoint is a bigram model (v1): it has no attention to draw; use v2 onwards.")
    if not prompt:
        raise UsageError("the prompt is empty: give a few characters to attend over, e.g. --prompt 'ROMEO:'.")
    if len(prompt) > model.config.block_size:
        raise UsageError(
            f"the prompt has {len(prompt)} characters, more than the model's block_size "
            f"{model.config.block_size}: shorten it."
        )
    ids = tokenizer.encode(prompt)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        _, weights = model.attention_weights(torch.tensor([ids], device=device))
    finally:
        model.train(was_training)
    return weights[:, 0].float().cpu()


def attention_figure(weights: torch.Tensor, prompt: str, title: str = ""):
    """A matplotlib figure: one panel per layer (rows) and head (columns), queries down, keys across."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    n_layer, n_head, T, _ = weights.shape
    labels = [_VISIBLE.get(ch, ch) for ch in prompt]
    panel = max(1.6, 0.22 * T)
    fig, axes = plt.subplots(
        n_layer, n_head, figsize=(panel * n_head + 0.6, panel * n_layer + 0.8), dpi=100, squeeze=False
    )
    for layer in range(n_layer):
        for head in range(n_head):
            ax = axes[layer][head]
            ax.imshow(weights[layer, head].numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_xticks(range(T), labels, fontsize=7, family="monospace")
            ax.set_yticks(range(T), labels, fontsize=7, family="monospace")
            ax.tick_params(length=0)
            ax.set_title(f"layer {layer} head {head}", fontsize=8)
    fig.suptitle(title or f"attention over {prompt!r}: row = position, column = position attended to", fontsize=9)
    fig.tight_layout()
    return fig


def attention(*, ckpt_path: str, prompt: str = "ROMEO:", out: Path = Path("attention.png")) -> None:
    """Draw a checkpoint's attention weights over a prompt as a PNG: one panel per layer and head.

    Args:
        ckpt_path: A .ckpt file written by fit (v2 onwards; v1, the bigram, has no attention).
        prompt: Characters to attend over, at most the model's block_size; each is an axis label.
        out: The PNG file to write.
    """
    model, tokenizer = load_checkpoint(ckpt_path)
    weights = prompt_weights(model, tokenizer, prompt)
    import matplotlib.pyplot as plt

    out = Path(out)
    if not str(out).strip() or out.is_dir():
        raise UsageError(f"--out {str(out)!r} is not a file name: name the PNG to write, e.g. --out attention.png.")
    if not out.parent.is_dir():
        raise UsageError(f"folder {out.parent} does not exist: create it or choose another --out.")
    fig = attention_figure(weights, prompt)
    try:
        write_atomic(out, lambda f: fig.savefig(f, format="png"))
    except OSError as err:
        raise UsageError(f"cannot write {out} ({err.strerror or err}): choose another --out.") from None
    finally:
        plt.close(fig)
    print(f"attention: {out} ({weights.shape[0]} layers x {weights.shape[1]} heads over {len(prompt)} characters)")


class AttentionMaps(L.Callback):
    """The attention figure of a fixed prompt in TensorBoard's Images tab, every few estimates.

    Off by default: drawing the panels costs more than the estimate itself on small models.
    """

    def __init__(self, every_n_estimates: int = 0, prompt: str = "ROMEO:") -> None:
        """
        Args:
            every_n_estimates: Log the figure at every Nth estimate (0: never).
            prompt: Characters to attend over, at most block_size; each is an axis label.
        """
        super().__init__()
        if every_n_estimates < 0:
            raise UsageError(f"attention.every_n_estimates must be 0 or more, got {every_n_estimates}.")
        self.every_n_estimates = every_n_estimates
        self.prompt = prompt
        self.estimates = 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A bigram model, a prompt too long or outside the vocabulary: said now, not at the first figure."""
        if self.every_n_estimates:
            prompt_weights(pl_module.model, trainer.datamodule.tokenizer, self.prompt)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loggers = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
        if not self.every_n_estimates or not loggers or not trainer.is_global_zero or trainer.state.fn != "fit":
            return
        self.estimates += 1
        if self.estimates % self.every_n_estimates:
            return
        import matplotlib.pyplot as plt

        weights = prompt_weights(pl_module.model, trainer.datamodule.tokenizer, self.prompt)
        fig = attention_figure(weights, self.prompt, title=f"attention over {self.prompt!r} at step {trainer.global_step}")
        for logger in loggers:
            logger.experiment.add_figure(ATTENTION_TAG, fig, global_step=trainer.global_step, close=False)
        plt.close(fig)
