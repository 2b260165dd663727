"""The run's machinery, kept apart so the lecture's rooms (model, data, module) stay plain to read.

- ``checkpoint``: what a checkpoint is: the gate every ``--ckpt_path`` passes, atomic writes, ``last``.
- ``folders``: where runs live: one writer per run folder, checked writable before the first step.
- ``resume``: what a checkpoint adds for an exact resume (dropout's random state, step labels).
- ``stop``: signals, the stop every process agrees on, the NaN guard.
- ``steps``: what a step is (optimizer steps, logging steps) and the one collective for decisions.
- ``seeds``: every random stream's seed, per process.
- ``precision``: the precision a run gets on the GPU it runs on.
- ``files``: writing and deleting in folders others share.
- ``framework``: the framework's privates that rooms outside ``run/`` need, behind plain names.

Lightning's and torch's private attributes are used here and nowhere else in the package
(``tests/test_privates.py`` fails otherwise). Each, what it is for, and why no public API serves
(read from lightning 2.6.6 and torch 2.13.0, the tested versions):

- ``resume.LastCheckpoint``: ``ModelCheckpoint._should_save_on_train_epoch_end``,
  ``_should_skip_saving_checkpoint``, ``_save_last_checkpoint``, ``_monitor_candidates``: write
  ``last.ckpt`` after every estimate; the public ``save_last`` writes it only with a best-k save.
- ``resume.ResumedStepCount`` and ``steps.optimizer_step``: ``_TrainingEpochLoop._batches_that_stepped``,
  the loggers' step count, which a restart leaves one short; no public setter exists.
- ``steps.ends_optimizer_step``: ``_TrainingEpochLoop._should_accumulate()``, whether this batch
  ends an accumulation window; Lightning exposes no public flag for it.
- ``stop.GracefulStop``: ``Trainer._accelerator_connector.cluster_environment`` (the SLURM
  environment; the public ``trainer.strategy.cluster_environment`` is absent on some strategies),
  ``Trainer._signal_connector.received_sigterm`` (the one flag that makes Lightning stop at the end
  of a step, public ``received_sigterm`` is read-only), ``_TrainingEpochLoop._broadcast_sigterm_tensor``
  (a per-step collective and host sync, switched off), and ``ModelCheckpoint._save_last_checkpoint``
  / ``_monitor_candidates`` for the stop's ``last.ckpt`` under Lightning's own naming.
- ``folders.launching_process``: ``lightning.fabric.utilities.rank_zero._get_rank``, the rank the
  launcher set, before any strategy exists.
- ``framework.compute_dtype``: ``lightning.pytorch.callbacks.throughput_monitor._plugin_to_compute_dtype``,
  the dtype matmuls run in under a precision plugin (the MFU's peak); no public function maps them.
- ``framework.event_writer``: ``SummaryWriter._get_file_writer()``, the run's own event file, for
  the HPARAMS tab (the public ``add_hparams`` writes a second run beside it).
- ``framework.RunCLI``: ``LightningCLI._parse_ckpt_path`` (overridden: the checkpoint's
  hyper-parameters must not replace the config's), ``_run_subcommand`` (wrapped: run folders are
  released however a subcommand ends), ``_get`` (a subcommand's section of the config).
"""
