"""Training glue: the GPT, its optimizer and the lecture's evaluation protocol, as a LightningModule."""

from __future__ import annotations

from dataclasses import asdict
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MeanMetric
from torchmetrics.text import Perplexity

from nanogpt_pl.run import steps
from nanogpt_pl.data import SPLITS
from nanogpt_pl.errors import UsageError
from nanogpt_pl.model import GPT, GPTConfig
from nanogpt_pl.optim import CombinedOptimizer, hidden_matrices, optimizer_members

# The estimate of each split, as the lecture's ``estimate_loss`` prints it.
EVAL_TAGS = {"train": "train/loss_eval", "val": "val/loss"}
# exp of the same estimates: the mean over the same tokens of the model's "surprise" per character.
PERPLEXITY_TAGS = {"train": "train/perplexity_eval", "val": "val/perplexity"}


class GPTModule(L.LightningModule):
    """Trains a ``GPT`` on random blocks and estimates its train/val loss the lecture's way."""

    def __init__(
        self,
        config: GPTConfig = GPTConfig(),
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        hidden_optimizer: Optional[OptimizerCallable] = None,
        compile: bool = False,
    ) -> None:
        """
        Args:
            config: The model's architecture; each flag is one step of the lecture.
            optimizer: Optimizer built over the model's parameters (AdamW at a constant learning rate).
            lr_scheduler: Learning-rate schedule over the optimizer, stepped once per optimizer step
                (none: the lecture's constant rate).
            hidden_optimizer: Optimizer for the blocks' hidden matrices (``torch.optim.Muon``), ``optimizer``
                then takes only the rest: embeddings, lm_head, norm gains and biases
                (``nanogpt_pl.optim.hidden_matrices`` is the rule). None: ``optimizer`` takes everything.
            compile: Train and evaluate through ``torch.compile`` (compiled once, at the first step;
                checkpoints and generation use the plain model).
        """
        super().__init__()
        if isinstance(config, dict):  # as stored in a checkpoint's hyper-parameters
            config = GPTConfig(**config)
        # Plain types only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters({"config": asdict(config)})
        self.model = GPT(config)
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.hidden_optimizer = hidden_optimizer
        self.compile_model = compile
        self._compiled = None
        # Keyed "<split>_loss": a plain "train" key would shadow nn.Module.train.
        self.loss_estimates = torch.nn.ModuleDict({f"{split}_loss": MeanMetric() for split in SPLITS})
        self.perplexities = torch.nn.ModuleDict({f"{split}_perplexity": Perplexity() for split in SPLITS})

    def forward(self, idx, targets=None):
        return self.model(idx, targets)

    @property
    def step_model(self):
        """The model as training and evaluation call it: compiled on first use if ``compile`` is set.

        The compiled wrapper is kept outside the module tree, so state dicts (and checkpoints) keep
        the plain model's keys and ``self.model.generate`` never triggers a compilation.
        """
        if not self.compile_model:
            return self.model
        if self._compiled is None:
            # Static shapes: training and the stacked evaluation each get kernels specialized to
            # their one batch shape, instead of a slower dynamic-shape kernel shared by both.
            object.__setattr__(self, "_compiled", torch.compile(self.model, dynamic=False))
        return self._compiled

    def setup(self, stage: str) -> None:
        if self.trainer.strategy.root_device.type == "cuda":
            # TF32 tensor cores for the float32 matrix multiplications left outside autocast.
            torch.set_float32_matmul_precision("high")

    def on_train_start(self) -> None:
        self._window: list[torch.Tensor] = []  # the losses of the current optimizer step's batches
        self.step_loss: Optional[torch.Tensor] = None
        steps.count_estimates_in_optimizer_steps(self.trainer)

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        _, loss = self.step_model(x, y)
        # The loss of an optimizer step is the mean over its accumulated batches: the loss of the
        # whole batch the step trained on (on the device; read only when logged or drawn).
        self._window.append(loss.detach())
        if steps.ends_optimizer_step(self.trainer):
            window, self._window = self._window, []
            self.step_loss = window[0] if len(window) == 1 else torch.stack(window).mean()
            # Only on the steps the loggers write: each self.log call costs Lightning about a
            # millisecond of Python, as long as a whole step of the small models.
            if steps.is_logging_step(self.trainer):
                self.log("train/loss", self.step_loss)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # The lecture estimates the loss once more at the last step, whether or not it falls on
        # eval_interval. Asking to stop there makes Lightning run that final validation.
        if steps.is_last_step(self.trainer):
            self.trainer.should_stop = True

    def validation_step(self, batch, batch_idx):
        # Each batch stacks ``n_batches`` equal-sized random batches of one split: its mean loss
        # weighted by that count gives exactly the mean over the lecture's per-batch losses.
        # Under DDP each process holds its share of the batches; the metric sums values and
        # weights over all processes when computed, so the estimate covers every process's batches.
        x, y, request = batch
        logits, loss = self.step_model(x, y)
        metric = self.loss_estimates[f"{request.split}_loss"]
        metric.update(loss, weight=request.n_batches)
        self.log(EVAL_TAGS[request.split], metric)
        perplexity = self.perplexities[f"{request.split}_perplexity"]
        perplexity.update(logits.float(), y)
        self.log(PERPLEXITY_TAGS[request.split], perplexity)

    def on_validation_epoch_end(self) -> None:
        # The estimate after N optimizer steps belongs at step N of the loggers' x-axis; Lightning
        # would file it under N - 1 (the last training batch's index). A logged "step" sets it.
        # (The same on every process; sync_dist only spares a warning under DDP.)
        if self.trainer.state.fn == "fit":
            self.log("step", float(self.global_step), sync_dist=True)

    def on_validation_end(self) -> None:
        # Only for the loggers: left in callback_metrics, a stale "step" would name checkpoints
        # saved between evaluations.
        self.trainer.callback_metrics.pop("step", None)

    test_step = validation_step

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Which optimizers the state belongs to, so a resume with another one is refused by name
        # (nanogpt_pl.run.checkpoint) before its state is poured into the wrong update rule.
        checkpoint["optimizer_names"] = [type(o).__name__ for o in optimizer_members(self.trainer.optimizers)]

    def configure_optimizers(self):
        if self.hidden_optimizer is None:
            optimizer = self.optimizer(self.parameters())
        else:
            hidden, rest = hidden_matrices(self.model)
            if not hidden:
                raise UsageError("model.hidden_optimizer needs hidden matrices, and a bigram model (v1) has none: leave it out.")
            hidden_optimizer = self.hidden_optimizer(hidden)
            for group in hidden_optimizer.param_groups:  # torch.optim.Muon checks this only at its first step
                if not 0 <= group.get("ns_steps", 0) < 100:
                    raise ValueError(f"Muon ns_steps must be in 0..99, got {group['ns_steps']}")
            optimizer = CombinedOptimizer([self.optimizer(rest), hidden_optimizer])
        if self.lr_scheduler is None:
            return optimizer
        base_rates = [group["lr"] for group in optimizer.param_groups]
        # Per step, not per epoch: warm-up and decay are counted in steps, and the stream is one epoch.
        scheduler = {"scheduler": self.lr_scheduler(optimizer), "interval": "step"}
        scales = {round(group["lr"] / rate, 9) for group, rate in zip(optimizer.param_groups, base_rates) if rate}
        if isinstance(optimizer, CombinedOptimizer) and len(scales) > 1:
            raise ValueError(
                f"{type(scheduler['scheduler']).__name__} sets one rate for both optimizers' groups, so Muon "
                "would train at AdamW's rate: give OneCycleLR's max_lr a list (AdamW's, then Muon's) or use "
                "nanogpt_pl.optim.LinearWarmdown"
            )
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
