"""The command line: LightningCLI over ``GPTModule`` and ``CharDataModule``.

``fit``, ``validate`` and ``test`` are Lightning's own; every argument comes from a signature and
its docstring, so ``--help`` and ``--print_config`` describe exactly what the code accepts.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
import warnings
from pathlib import Path

from jsonargparse import ArgumentError, Namespace, auto_cli, set_parsing_settings
from lightning.fabric.utilities.seed import max_seed_value, min_seed_value
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

import nanogpt_pl
from nanogpt_pl import resources
from nanogpt_pl.attention import AttentionMaps
from nanogpt_pl.corpus import load_corpus
from nanogpt_pl.data import CharDataModule, vocab_size_of
from nanogpt_pl.errors import UsageError
from nanogpt_pl.model import GPTConfig
from nanogpt_pl.module import GPTModule
from nanogpt_pl.monitoring import HParamsMetric, TextSample, TokenThroughput
from nanogpt_pl.optim import optimizer_members
from nanogpt_pl.run import checkpoint, folders, precision, resume
from nanogpt_pl.run.framework import RunCLI
from nanogpt_pl.terminal import RunSummary, TrainingBar, quiet_known_noise

set_parsing_settings(docstring_parse_attribute_docstrings=True)

TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "tb_logs", "name": None, "default_hp_metric": False},
    },
    "max_steps": 5000,
    # The lecture's eval_interval: the estimate runs every 500 steps, counted across "epochs"
    # (our training stream is endless, so there is only one).
    "val_check_interval": 500,
    "check_val_every_n_epoch": None,
    # A sanity pass would spend a full evaluation before step 0 and advance the eval sampler.
    "num_sanity_val_steps": 0,
    # Checkpoints are written to a temporary file and renamed: a kill never leaves a truncated one.
    "plugins": {"class_path": "nanogpt_pl.run.checkpoint.AtomicCheckpointIO"},
}


class GPTCLI(RunCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's fit, validate and test; predict has no meaning for a language model here."""
        subcommands = LightningCLI.subcommands()
        return {name: subcommands[name] for name in ("fit", "validate", "test")}

    def add_arguments_to_parser(self, parser) -> None:
        # Stated once, in data; the model follows.
        parser.link_arguments("data.block_size", "model.config.block_size")
        # The vocabulary is the corpus's. Reading it (from the token cache, built on first use)
        # while parsing also checks the text before anything is built or written.
        parser.link_arguments(
            ("data.data_path", "data.block_size", "data.train_fraction", "data.cache_dir"),
            "model.config.vocab_size",
            compute_fn=vocab_size_of,
        )
        parser.add_lightning_class_args(resume.LastCheckpoint, "checkpoint")
        parser.add_lightning_class_args(TextSample, "sample")
        parser.add_lightning_class_args(AttentionMaps, "attention")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.save_last": True,
                "checkpoint.filename": "step{step}-val{val/loss:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )

    def parse_arguments(self, parser, args) -> None:
        """Check the model's sizes and the seed right after parsing, before seeding, building or writing anything.

        ``--config v7`` names a shipped config unless a file of that name is here: the names are
        resolved before jsonargparse reads the files.
        """
        if args is None:  # the command line, read here rather than by Lightning, which would warn
            self.config = parser.parse_args(resources.resolve_config_arguments(sys.argv[1:]))
        elif isinstance(args, (dict, Namespace)):
            super().parse_arguments(parser, args)
        else:
            super().parse_arguments(parser, resources.resolve_config_arguments(args))
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        GPTConfig(**config.model.config.as_dict())
        seed = config.get("seed_everything")
        if not isinstance(seed, bool) and isinstance(seed, int) and not min_seed_value <= seed <= max_seed_value:
            raise UsageError(
                f"seed_everything must be an integer from {min_seed_value} to {max_seed_value} (or true for a "
                f"random one), got {seed}."
            )

    def before_instantiate_classes(self) -> None:
        """Name the TensorBoard run after the config file (``configs/v7.yaml`` logs to ``tb_logs/v7``).

        Also: fit the precision to the GPU the run will use (fp16 where bf16 is only emulated:
        ``nanogpt_pl.run.precision``). And find the checkpoint ``--ckpt_path last`` stands for.
        """
        config = self.config[self.subcommand] if self.subcommand else self.config
        self._continues_run = False  # set by _resolve_last_checkpoint
        self._saved_optimizers = None  # set by _gate_checkpoint when fit continues a checkpoint
        self._run_folders: list[folders.RunFolder] = []  # set by _claim_run_folders
        precision.fit_to_device(config.trainer, config.model)
        logger = config.trainer.logger
        if logger and getattr(logger, "init_args", None) is not None and logger.init_args.get("name") is None:
            # A config given as text (from a pipe) has no file name: jsonargparse keeps it as None.
            files = [f for f in config.get("config") or [] if f is not None and f.relative not in (None, "None")]
            logger.init_args.name = Path(str(files[-1])).stem if files else "nanogpt"
        if config.get("ckpt_path") in ("last", "auto"):
            self._resolve_last_checkpoint(config)
        if config.get("ckpt_path"):
            self._gate_checkpoint(config)
        self._claim_run_folders(config)

    def _gate_checkpoint(self, config) -> None:
        """Refuse a checkpoint that is remote, unreadable, foreign or of another model, before anything is written."""
        path = config.ckpt_path
        saved = checkpoint.read_checkpoint(path)
        data = config.data
        vocab = load_corpus(data.data_path, data.get("cache_dir")).chars  # the cache the parse-time link built
        replaced = checkpoint.check_fits(path, saved, GPTConfig(**config.model.config.as_dict()), vocab)
        if self.subcommand == "fit":
            checkpoint.check_optimizer(path, saved, config.model.get("hidden_optimizer") is not None)
            self._saved_optimizers = checkpoint.saved_optimizers(saved)  # checked once built
        if replaced:
            print(f"note: the command line replaces {path}'s {', '.join(replaced)}", file=sys.stderr)

    def _resolve_last_checkpoint(self, config) -> None:
        """``--ckpt_path last``: the newest ``last.ckpt`` of this config's runs; ``fit`` continues that run.

        Continuing means logging into the same version folder, so TensorBoard shows one run and the
        next ``last`` finds the newest checkpoint. Without ``--ckpt_path``, ``fit`` always starts afresh.
        ``--ckpt_path auto`` is ``last`` when there is a checkpoint and a fresh run when there is none:
        the one command a requeued cluster job can run every time (a folder another run holds is
        refused as with ``last``, never trained into). Ends with ``config.ckpt_path`` a path or None.
        """
        try:
            last = checkpoint.find_last_checkpoint(*self._checkpoint_search(config))
        except checkpoint.NoCheckpoint:
            if config.ckpt_path != "auto":
                raise
            config.ckpt_path = None
            return
        config.ckpt_path = str(last)
        self._continues_run = True
        init_args = self._versioned_logger(config)
        if init_args is not None and not config.checkpoint.dirpath and self.subcommand == "fit":
            init_args.version = last.parent.parent.name

    def _checkpoint_search(self, config) -> tuple[Path, str]:
        """Where ``last`` looks: ``--checkpoint.dirpath``, else every version folder of the logger's
        ``<save_dir>/<name>`` (Lightning's ``<version>/checkpoints``), else ``<default_root_dir>/checkpoints``."""
        init_args = self._versioned_logger(config)
        if config.checkpoint.dirpath:
            return Path(config.checkpoint.dirpath), ""
        if init_args is not None:
            return Path(init_args.save_dir) / init_args.name, "*/checkpoints/"
        return Path(config.trainer.default_root_dir or ".") / "checkpoints", ""

    @staticmethod
    def _versioned_logger(config):
        """The logger's init_args where it writes ``<save_dir>/<name>/<version>`` (TensorBoard, CSV), else None."""
        init_args = getattr(config.trainer.logger, "init_args", None)
        if init_args is not None and init_args.get("save_dir") is not None and "version" in init_args:
            return init_args
        return None

    def _claim_run_folders(self, config) -> None:
        """``fit``: one writer per run folder, fresh or resumed: every folder the run will write its
        checkpoints and logs into is locked (``folders.RunFolder``) before anything is built.

        A fresh run's version folder is created here, not left to the logger, so two runs started at
        once get two folders. Only the launching process claims (the others of a DDP run write nothing).
        """
        if self.subcommand != "fit" or not folders.launching_process():
            return
        init_args = self._versioned_logger(config)
        try:
            if init_args is not None:
                parent = Path(init_args.save_dir) / init_args.name
                version = init_args.version
                if version is None:
                    folder = folders.RunFolder.claim_new_version(parent)
                    init_args.version = folder.folder.name
                else:  # Lightning's naming: an int k is version_k, a string is the folder's name
                    name = version if isinstance(version, str) else f"version_{version}"
                    folder = folders.RunFolder.lock(parent / name)
                self._run_folders.append(folder)
            if config.checkpoint.dirpath:
                self._run_folders.append(folders.RunFolder.lock(Path(config.checkpoint.dirpath)))
            elif init_args is None:
                root = Path(config.trainer.default_root_dir or ".")
                self._run_folders.append(folders.RunFolder.lock(root / "checkpoints"))
        except UsageError:
            self._release_run_folders()
            raise

    def _release_run_folders(self) -> None:
        for folder in self._run_folders:
            folder.release()
        self._run_folders = []

    def run_subcommand(self, subcommand: str) -> None:
        with warnings.catch_warnings():
            if self._continues_run:
                # Continuing a run means writing into its checkpoint folder: Lightning's warning
                # that the folder "exists and is not empty" describes the expected case.
                warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
            super().run_subcommand(subcommand)

    def end_run(self) -> None:
        self._release_run_folders()

    def instantiate_classes(self) -> None:
        """Build everything, turning a constructor's refusal (Lightning's MisconfigurationException, a
        ValueError of PyTorch's optimizer or Lightning's trainer) into one line before anything runs.

        The optimizer is built once here, so its arguments (a negative learning rate, say) are checked
        before the run writes its log folder. A refusal leaves no trace: a run folder claimed for
        the run and still empty is removed.
        """
        try:
            super().instantiate_classes()
            configured = self.model.configure_optimizers()
            if self._saved_optimizers is not None:
                optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
                path = self.section(self.config, "ckpt_path")
                kept = checkpoint.check_optimizer_settings(path, self._saved_optimizers, optimizer_members([optimizer]))
                if kept:
                    print(
                        f"note: the resumed run keeps {path}'s optimizer settings: {'; '.join(kept)}. To train "
                        "with other settings, start a new run (leave out --ckpt_path).",
                        file=sys.stderr,
                    )
            trainer = self.trainer
            interval = trainer.val_check_interval
            if isinstance(interval, (int, float)) and not interval > 0:
                raise ValueError(f"trainer.val_check_interval must be positive, got {interval}")
            if self.datamodule is not None:
                self.datamodule.check_processes(self.trainer.world_size)
        except BaseException as err:
            self._release_run_folders()
            if isinstance(err, (MisconfigurationException, ValueError)):
                raise UsageError(f"invalid configuration: {str(err).splitlines()[0]} (see --help).") from None
            raise

    def instantiate_trainer(self, **kwargs) -> Trainer:
        """Lightning's trainer with this project's resume, stop and monitoring callbacks: always
        present, whatever ``trainer.callbacks`` adds, and built per run since they hold its state.

        Resume and stop come first: the step count they restore is what the others log against.
        """
        config = self.section(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        callbacks = [*resume.callbacks(), *callbacks, TokenThroughput(), HParamsMetric(), RunSummary()]
        if config.get("logger") is not False:
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        # Lightning refuses a bar callback when the bar is off, and adds its own when none is given.
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(TrainingBar())
        return super().instantiate_trainer(**{**kwargs, "callbacks": callbacks})


def cli(args=None, run: bool = True) -> GPTCLI:
    quiet_known_noise()
    return GPTCLI(
        GPTModule,
        CharDataModule,
        seed_everything_default=1337,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,  # the optimizer is model.optimizer, stated once
        # Parse errors raise instead of printing the whole usage; main() prints one line.
        parser_kwargs={name: {"exit_on_error": False} for name in ("fit", "validate", "test")}
        | {"exit_on_error": False, "prog": _prog(), "description": _description()},
        args=args,
        run=run,
    )


# Commands beyond Lightning's fit/validate/test: name -> "module:function", each function a
# small CLI of its own (its signature and docstring are its arguments and --help).
COMMANDS: dict[str, str] = {
    "generate": "nanogpt_pl.generate:generate",
    "attention": "nanogpt_pl.attention:attention",
    "reproduce": "nanogpt_pl.reproduce:reproduce",
    "configs": "nanogpt_pl.catalog:configs",
    "cache": "nanogpt_pl.cache_command:cache",
}


def _prog() -> str:
    """How the user called us, for usage lines: ``python -m nanogpt_pl`` rather than ``__main__.py``."""
    name = Path(sys.argv[0]).name
    return "python -m nanogpt_pl" if name in ("__main__.py", "-m", "") else name


def _description() -> str:
    text = (
        "Train and evaluate the GPTs of \"Let's build GPT\": configs/v1.yaml (a bigram table) to "
        "configs/v7.yaml (the scaled-up Transformer), and on to configs/v8_cpu.yaml (the changes "
        "adopted since)."
    )
    if COMMANDS:
        text += f" Other commands: {', '.join(COMMANDS)} (each with --help)."
    return text


def main(args=None) -> None:
    """Entry point of ``python -m nanogpt_pl`` and ``nanogpt-pl``."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["--version"]:
        print(f"{_prog()} {_version()}")
        return
    try:
        if argv and argv[0] in COMMANDS:
            module, function = COMMANDS[argv[0]].split(":")
            command = getattr(importlib.import_module(module), function)
            auto_cli(command, args=argv[1:], exit_on_error=False, prog=f"{_prog()} {argv[0]}")
        else:
            cli(args)
    except (UsageError, ArgumentError) as err:
        print(f"error: {_root_message(err)}", file=sys.stderr)
        sys.exit(2)
    except MisconfigurationException as err:  # a combination Lightning refuses only once the run has started
        print(f"error: invalid configuration: {str(err).splitlines()[0]} (see --help).", file=sys.stderr)
        sys.exit(2)
    except SIGTERMException:  # stopped by SIGTERM or Ctrl-C, checkpoint written: not a finished run
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C where nothing needs saving (generate), or a second one in fit
        print("\nerror: interrupted (Ctrl-C).", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # the reader of stdout went away (`generate ... | head`): quiet, as standard tools are
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more reaches the closed pipe
        sys.exit(141)  # 128 + SIGPIPE, what a shell reports for a tool stopped by a closed pipe
    except OSError as err:  # a file the command reads or writes refused (permissions, a full disk, ...)
        if err.filename is None:
            raise
        print(f"error: cannot use {err.filename} ({err.strerror or err}).", file=sys.stderr)
        sys.exit(1)


def _version() -> str:
    """The installed distribution's version; a source checkout that was never installed has only ``__version__``."""
    try:
        return importlib.metadata.version("nanogpt_pl")
    except importlib.metadata.PackageNotFoundError:
        return nanogpt_pl.__version__


def _root_message(err: BaseException) -> str:
    """Our own message when a parse error wraps one (e.g. a bad data file met while linking)."""
    cause = err
    while cause is not None:
        if isinstance(cause, UsageError):
            return str(cause)
        cause = cause.__cause__
    # jsonargparse spreads one complaint over indented lines ("Parser key ...:\n  Expected ..."): one line.
    return " ".join(f"{err} (see --help)".split())
