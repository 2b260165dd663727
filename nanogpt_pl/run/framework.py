"""The framework's private attributes that rooms outside ``run/`` need, behind plain names.

Each is listed, with its reason, in ``nanogpt_pl.run``'s docstring.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype
from lightning.pytorch.cli import LightningCLI


def compute_dtype(trainer) -> torch.dtype:
    """The dtype the matmuls of ``trainer``'s precision plugin run in (bf16 under bf16-mixed, ...)."""
    return _plugin_to_compute_dtype(trainer.precision_plugin)


def event_writer(logger):
    """The TensorBoard logger's own event-file writer (``SummaryWriter.add_hparams`` would open a
    second run for the hyper-parameters)."""
    return logger.experiment._get_file_writer()


class RunCLI(LightningCLI):
    """``LightningCLI`` with the two private hooks this project changes.

    - The checkpoint's hyper-parameters never replace the config's (Lightning's ``_parse_ckpt_path``
      would): the config is the request, and ``nanogpt_pl.run.checkpoint`` checks the checkpoint against it.
    - ``end_run`` is called however a subcommand ends (Lightning's ``_run_subcommand`` runs it).
    """

    def _parse_ckpt_path(self) -> None:
        pass

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            self.run_subcommand(subcommand)
        finally:
            self.end_run()

    def run_subcommand(self, subcommand: str) -> None:
        """Lightning's own run of ``fit``/``validate``/``test``; a subclass wraps it."""
        super()._run_subcommand(subcommand)

    def end_run(self) -> None:
        """After the subcommand, whether it finished, failed or was stopped."""

    def section(self, config, key: str, default: Optional[Any] = None) -> Any:
        """``config[key]`` of the running subcommand (Lightning's ``_get``)."""
        return self._get(config, key, default=default)
