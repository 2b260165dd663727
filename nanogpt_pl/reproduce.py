"""``reproduce``: the lecture's table, measured. Each version's config is trained with ``fit`` over a
few seeds, and the final estimates are read back from the runs' TensorBoard event files.

Each config names its own reference in its header, in a line the table is built from::

    # target: val 2.4084
    # device: gpu        (only where a GPU is present: reproduce skips it on a CPU by default)
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import lightning
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from nanogpt_pl import resources
from nanogpt_pl.cli import cli
from nanogpt_pl.errors import UsageError
from nanogpt_pl.run.files import write_text_atomic
from nanogpt_pl.generate import load_checkpoint, sample
from nanogpt_pl.module import EVAL_TAGS
from nanogpt_pl.report import write_report

# The gallery's sampling: 300 characters (a dozen lines of verse) from a newline, one fixed seed.
GALLERY_TOKENS = 300
GALLERY_SEED = 1337


def reproduce(
    versions: Optional[str] = None,
    seeds: str = "1337,1,2",
    out: Path = Path("results"),
    configs: Path = resources.configs_dir(),
    max_steps: Optional[int] = None,
    eval_iters: Optional[int] = None,
    samples_only: bool = False,
    jobs: int = 1,
) -> None:
    """Train the lecture's versions over several seeds and write results.json, results.md, val_loss.png,
    after_lecture.png and samples.md (a text from each version's first seed, side by side).

    Args:
        versions: Comma-separated config names from the configs folder (v1,v3_ffn,...); default
            every config this machine can run: the GPU-only ones (v7) only where a GPU is present.
        seeds: Comma-separated seeds; each version is trained once per seed.
        out: Folder for the results; the TensorBoard runs go to its runs/<version>/seed<seed>/.
            Records of versions already in its results.json and not run again are kept.
        configs: Folder holding the versions' YAML files; default the lecture's, shipped with the package.
        max_steps: Train every run for this many steps instead of its config's (a quick look, not the table).
        eval_iters: Batches per loss estimate instead of the config's (a quick look, not the table).
        samples_only: Train nothing: sample the chosen versions again from the last.ckpt of their
            recorded first seed under <out>/runs/, and rewrite the reports.
        jobs: Runs trained at once, each in its own process with one thread (the small models gain
            little from a second thread, and N runs side by side finish about N times sooner on N
            free cores; no more processes than runs). Every run's figures are those of a one-thread
            serial run.
    """
    seed_list = _parse_seeds(seeds)
    chosen = _select(Path(configs), versions)
    for name, value in (("max_steps", max_steps), ("eval_iters", eval_iters), ("jobs", jobs)):
        if value is not None and value < 1:
            raise UsageError(f"--{name} must be a positive integer, got {value}.")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder: choose a folder for the results (it is created if missing).")
    _check_writable(out)  # now, not after hours of training
    with _lock_out(out):  # one reproduction per folder, from before anything in it is cleared
        _reproduce(chosen, seed_list, seeds, out, Path(configs), max_steps, eval_iters, samples_only, jobs)


def _reproduce(chosen, seed_list, seeds, out, configs, max_steps, eval_iters, samples_only, jobs) -> None:
    results_path = out / "results.json"
    records = _load_records(results_path)  # a damaged file is reported now, not after hours of training
    headers = {path.stem: read_header(path) for path in sorted(configs.glob("*.yaml"))}
    if samples_only:
        _resample(chosen, records, out, headers)
        return
    command = f"python -m nanogpt_pl reproduce --versions {','.join(c.stem for c in chosen)} --seeds {seeds}"
    overrides = []
    if max_steps is not None:
        overrides += ["--trainer.max_steps", str(max_steps)]
        command += f" --max_steps {max_steps}"
    if eval_iters is not None:
        overrides += ["--data.eval_iters", str(eval_iters)]
        command += f" --eval_iters {eval_iters}"

    pairs = [(config, seed) for config in chosen for seed in seed_list]
    runs = [
        (str(config), seed, str(out / "runs"), f"[{i}/{len(pairs)}] {config.stem} seed {seed}", overrides)
        for i, (config, seed) in enumerate(pairs, 1)
    ]
    done: dict[int, dict] = {}  # run index -> its figures
    recorded: dict[str, dict] = {}

    def record(partial: bool = False) -> None:
        """Each version whose runs are all done (``partial``: each with any done) into the reports."""
        for v, config in enumerate(chosen):
            finished = [done[i] for i in range(v * len(seed_list), (v + 1) * len(seed_list)) if i in done]
            if config.stem in recorded or not finished or (len(finished) < len(seed_list) and not partial):
                continue
            recorded[config.stem] = _record(config, finished, command)
            recorded[config.stem]["sample"] = gallery_sample(out, config.stem, finished[0]["seed"])
            # The folder's other records are re-read each time, so they survive another reproduce
            # having written there before this one.
            write_report({**_load_records(results_path), **recorded}, out, headers)

    def finish(index: int, figures: dict) -> None:
        done[index] = figures
        record()  # after every version, so an interrupted reproduction keeps what it finished

    try:
        _run_all(runs, min(jobs, len(runs)), finish)
    except RunsEnded as ended:
        record(partial=True)
        recorded_in = f", recorded in {results_path}" if done else ""
        saved = (f"; {len(ended.stopped)} stopped with a last.ckpt ({', '.join(ended.stopped)}: a rerun of reproduce "
                 "trains them again from step 0)") if ended.stopped else ""
        not_started = len(runs) - len(done) - len(ended.stopped) - ended.failed
        print(f"reproduce {ended.why}. {len(done)} of {len(runs)} runs finished{recorded_in}{saved}; "
              f"{not_started} not started.", file=sys.stderr, flush=True)
        if ended.failed:
            sys.exit(1)
        raise SIGTERMException from None
    _print_outputs(out)


class RunsEnded(Exception):
    """The reproduction ended early: asked to stop, or one run failed (``failed``) and the others
    were stopped; ``stopped`` names the runs that stopped with their last.ckpt."""

    def __init__(self, why: str, stopped: list[str], failed: bool = False) -> None:
        super().__init__(why)
        self.why, self.stopped, self.failed = why, stopped, failed


def _name(run: tuple) -> str:
    return f"{Path(run[0]).stem} seed {run[1]}"


@contextlib.contextmanager
def _lock_out(out: Path):
    """Hold a lock on the folder ``out`` for the whole reproduction: a second one into the same folder
    is refused in one line, and the first is untouched (its run folders are cleared only under it).
    The lock is the folder's own (``flock`` on its descriptor), so no file is left behind."""
    import fcntl

    fd = os.open(out, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(
                f"{out} is in use by another reproduce: wait for it to finish, stop it, or choose another --out."
            ) from None
        yield
    finally:
        os.close(fd)


class _StopRequests:
    """SIGINT, SIGTERM and SIGHUP to the reproduction: the first stops it as a stopped fit stops
    (the running runs at the end of their step, with their last.ckpt; no new run starts); a second
    Ctrl-C quits at once. A fit running in this process handles them itself while it trains."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict = {}

    def __enter__(self) -> "_StopRequests":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signum = signum
        print(
            f"received {signal.Signals(signum).name}: stopping every running run at the end of its step (each "
            "writes its last.ckpt) and starting no new one (press Ctrl-C again to quit at once).",
            file=sys.stderr,
            flush=True,
        )


def _run_all(runs: list[tuple], jobs: int, finish) -> None:
    """Train every run, calling ``finish(index, figures)`` as each one ends; with ``jobs`` > 1 in that
    many one-thread processes at once. A stop request or a failed run ends it (``RunsEnded``) once
    every running run has stopped with its checkpoint."""
    with _StopRequests() as requests:
        if jobs == 1:
            for index, run in enumerate(runs):
                if requests.signum is not None:
                    raise RunsEnded(f"stopped by {signal.Signals(requests.signum).name}", [])
                try:
                    figures = _run(*run)
                except SIGTERMException:  # the fit in this process stopped, with its checkpoint
                    raise RunsEnded("stopped", [_name(run)]) from None
                except UsageError as err:  # the run's own error line, with what was recorded before it
                    raise RunsEnded(f"stopped: {_name(run)} failed (error: {err})", [], failed=True) from None
                finish(index, figures)
            return
        _run_parallel(runs, jobs, finish, requests)


def _run_parallel(runs: list[tuple], jobs: int, finish, requests: _StopRequests) -> None:
    """The runs in worker processes, each in a session of its own: a Ctrl-C in the terminal reaches
    only this process, which stops the workers with one SIGTERM each (what a stopped fit needs), and a
    worker whose parent dies is sent SIGTERM by the kernel (Linux), so none trains on alone."""
    pending = list(enumerate(runs))
    running: dict[int, tuple[subprocess.Popen, Path, Path]] = {}
    told: set[int] = set()  # the workers sent their SIGTERM
    scratch = Path(tempfile.mkdtemp(prefix="nanogpt_pl-reproduce-"))
    failure: Optional[str] = None
    stopped: list[int] = []  # indices of the runs that stopped with their checkpoint
    try:
        while True:
            ending = requests.signum is not None or failure is not None
            if not running and (ending or not pending):
                break
            while pending and len(running) < jobs and not ending:
                index, run = pending.pop(0)
                result, err = scratch / f"{index}.json", scratch / f"{index}.err"
                running[index] = (_start_worker(run, result, err), result, err)
            for index, (proc, result, err) in list(running.items()):
                if proc.poll() is None:
                    if ending and index not in told:
                        proc.send_signal(signal.SIGTERM)
                        told.add(index)
                    continue
                del running[index]
                if proc.returncode == 0 and result.is_file():
                    finish(index, json.loads(result.read_text(encoding="utf-8")))
                elif ending:
                    stopped.append(index)
                else:
                    failure = f"{_name(runs[index])} failed ({_last_line(err) or f'exit code {proc.returncode}'})"
            time.sleep(0.05)
    finally:
        for proc, _, _ in running.values():  # only left on a second Ctrl-C or an error of our own
            proc.kill()
            proc.wait()
        shutil.rmtree(scratch, ignore_errors=True)
    names = [_name(runs[i]) for i in sorted(stopped)]  # in the table's order
    if failure is not None:
        raise RunsEnded(f"stopped: {failure}", names, failed=True)
    if requests.signum is not None:
        raise RunsEnded(f"stopped by {signal.Signals(requests.signum).name}", names)


def _start_worker(run: tuple, result: Path, err: Path) -> subprocess.Popen:
    """``_worker`` for one run in a fresh interpreter that imports this very package."""
    package_root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    with open(err, "wb") as stderr:
        return subprocess.Popen(
            [sys.executable, "-c", "from nanogpt_pl.reproduce import _worker; _worker()",
             json.dumps(run), str(result), str(os.getpid())],
            env=env, stderr=stderr, start_new_session=True,
        )


def _worker() -> None:
    """One run of a parallel reproduction: its figures to the result file, or an error line on stderr."""
    run, result, parent = json.loads(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    _end_with_parent(parent)
    torch.set_num_threads(1)
    try:
        figures = _run(*run)
    except SIGTERMException:
        sys.exit(1)
    except Exception as err:  # the parent shows this line as the run's failure
        print(f"\n{'error' if isinstance(err, UsageError) else type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(2)
    write_text_atomic(result, json.dumps(figures))


def _end_with_parent(parent: int) -> None:
    """SIGTERM to this process when its parent dies (Linux's PR_SET_PDEATHSIG): it stops as a stopped fit."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        sys.exit(1)


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""


def _check_writable(out: Path) -> None:
    """``out`` exists (created if missing) and takes a file: one line otherwise, nothing created."""
    missing = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        for folder in missing:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise UsageError(f"cannot write the results folder {out} ({err.strerror or err}): choose another --out.") from None


def _print_outputs(out: Path) -> None:
    files = ("results.md", "results.json", "val_loss.png", "after_lecture.png", "samples.md")
    print(f"results: {', '.join(str(out / name) for name in files)}")


def gallery_sample(out: Path, version: str, seed: int) -> dict:
    """The gallery's text for one version: from the final checkpoint of its run with ``seed``.

    Same start (a newline), length and sampling seed for every version, so the texts differ only
    by what each version learned.
    """
    checkpoint = Path("runs") / version / f"seed{seed}" / "checkpoints" / "last.ckpt"
    model, tokenizer = load_checkpoint(out / checkpoint)
    generator = torch.Generator().manual_seed(GALLERY_SEED)
    text = sample(model, tokenizer, "", GALLERY_TOKENS, generator=generator)[0][1:]  # no start token
    return {"text": text, "checkpoint": checkpoint.as_posix(), "seed": GALLERY_SEED, "max_new_tokens": GALLERY_TOKENS}


def _resample(chosen: list[Path], records: dict, out: Path, headers: dict) -> None:
    """``--samples_only``: the gallery again from the checkpoints of runs already recorded."""
    unrecorded = [config.stem for config in chosen if config.stem not in records]
    if unrecorded:
        raise UsageError(
            f"no record of {', '.join(unrecorded)} in {out / 'results.json'}: run reproduce for it first, "
            "or choose recorded versions with --versions."
        )
    missing = [
        path for config in chosen
        if not (path := out / "runs" / config.stem / f"seed{records[config.stem]['seeds'][0]['seed']}"
                / "checkpoints" / "last.ckpt").is_file()
    ]
    if missing:
        raise UsageError(f"checkpoint not found: {missing[0]}: --out must be the folder the reproduction wrote.")
    for config in chosen:
        first_seed = records[config.stem]["seeds"][0]["seed"]
        records[config.stem]["sample"] = gallery_sample(out, config.stem, first_seed)
        print(f"{config.stem}: sampled from seed {first_seed}'s last.ckpt", flush=True)
    write_report(records, out, headers)
    _print_outputs(out)


def read_header(config: Path) -> dict:
    """A config's reference losses and device requirement, from its ``# target:`` and ``# device:`` lines."""
    target, device = {}, None
    for line in config.read_text(encoding="utf-8").splitlines():
        if match := re.match(r"#\s*target:(.*)", line):
            target = {split: float(value) for split, value in re.findall(r"(train|val)\s+([0-9.]+)", match[1])}
        elif match := re.match(r"#\s*device:\s*(\w+)", line):
            device = match[1].lower()
    return {"target": target or None, "device": device}


class RunProgress(Callback):
    """Says which run is training, how far along it is and its latest val loss, at every estimate."""

    def __init__(self, label: str) -> None:
        """
        Args:
            label: Names the run in every line, e.g. "[3/21] v3 seed 1".
        """
        self.label = label
        self.start = time.perf_counter()

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()
        print(f"{self.label}: training {trainer.max_steps} steps", flush=True)

    def on_validation_end(self, trainer, pl_module) -> None:
        val = trainer.callback_metrics.get(EVAL_TAGS["val"])
        shown = f", val {float(val):.4f}" if val is not None else ""
        elapsed = time.perf_counter() - self.start
        print(f"{self.label}: step {trainer.global_step}/{trainer.max_steps}{shown} ({elapsed:.0f} s)", flush=True)


def _load_records(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        records = None
    if not isinstance(records, dict):
        raise UsageError(f"{path} is not a reproduce results file: move it away or choose another --out.")
    return records


def _parse_seeds(seeds: str) -> list[int]:
    try:
        parsed = [int(s) for s in str(seeds).split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--seeds must be comma-separated integers, e.g. 1337,1,2; got {seeds!r}.") from None
    if not parsed or len(set(parsed)) != len(parsed):
        raise UsageError(f"--seeds must list distinct integers, e.g. 1337,1,2; got {seeds!r}.")
    return parsed


def _select(configs: Path, versions: Optional[str]) -> list[Path]:
    """The configs to run, checked before anything trains."""
    available = {path.stem: path for path in sorted(configs.glob("*.yaml"))}
    if not available:
        raise UsageError(f"no config files (*.yaml) in {configs}: point --configs to the repository's configs/ folder.")
    if versions is None:
        has_gpu = torch.cuda.is_available()
        return [path for path in available.values() if has_gpu or read_header(path)["device"] != "gpu"]
    names = [name.strip() for name in versions.split(",") if name.strip()]
    unknown = [name for name in names if name not in available]
    if unknown or not names:
        raise UsageError(
            f"unknown version(s) {', '.join(unknown) or repr(versions)}: choose from {', '.join(available)}."
        )
    if not torch.cuda.is_available():
        gpu_only = [name for name in names if read_header(available[name])["device"] == "gpu"]
        if gpu_only:
            raise UsageError(
                f"{', '.join(gpu_only)} needs a GPU and none is present: leave it out here and run it "
                "on a GPU machine (its config's header says 'device: gpu')."
            )
    return [available[name] for name in dict.fromkeys(names)]


def _run(config: str | Path, seed: int, runs_dir: str | Path, label: str, overrides: list[str]) -> dict:
    """One ``fit`` through the same command line users run, then its final estimates from TensorBoard."""
    config, runs_dir = Path(config), Path(runs_dir)  # as strings in a worker's arguments
    run_dir = runs_dir / config.stem / f"seed{seed}"
    # A TensorBoard run folder accumulates event files: start clean so only this run is read back
    # (the results folder is locked, so no other reproduction is using it).
    if os.path.lexists(run_dir):
        if not _is_run_folder(run_dir):
            raise UsageError(
                f"{run_dir} holds files that no run wrote (or is a link): move them away, or choose another --out."
            )
        shutil.rmtree(run_dir)
    progress = {"class_path": f"{__name__}.RunProgress", "init_args": {"label": label}}
    args = [
        "fit",
        "--config", str(config),
        "--seed_everything", str(seed),
        "--trainer.logger.init_args.save_dir", str(runs_dir),
        "--trainer.logger.init_args.version", f"seed{seed}",
        "--trainer.enable_progress_bar", "false",  # RunProgress reports instead, one line per estimate
        "--trainer.enable_model_summary", "false",
        "--trainer.devices", "1",  # one device, as the lecture ran (and no process launching per run)
        f"--trainer.callbacks+={json.dumps(progress)}",
        *overrides,
    ]
    start = time.perf_counter()
    # The run's arguments are all in ``args``: show Lightning a command line of its own (it warns
    # when sys.argv carries other arguments, here reproduce's).
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        trainer = cli(args=args).trainer
    finally:
        sys.argv = argv
    wall = time.perf_counter() - start
    curves = read_scalars(Path(trainer.logger.log_dir))
    missing = [tag for tag in EVAL_TAGS.values() if not curves.get(tag)]
    if missing:
        raise RuntimeError(f"{run_dir} logged no {', '.join(missing)}: the run ended before its final estimate.")
    return {
        "seed": seed,
        "train": curves[EVAL_TAGS["train"]][-1][1],
        "val": curves[EVAL_TAGS["val"]][-1][1],
        "steps": trainer.global_step,
        "wall_s": round(wall, 1),
        "device": device_name(trainer.strategy.root_device),
        "val_curve": curves[EVAL_TAGS["val"]],
    }


def _is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` holds only what a ``fit`` writes there (so clearing it loses nothing else)."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    written = {"checkpoints", "config.yaml", "hparams.yaml", ".run.lock"}
    return all(p.name in written or p.name.startswith("events.out.tfevents.") for p in folder.iterdir())


def read_scalars(log_dir: Path) -> dict[str, list[list[float]]]:
    """Every scalar of a TensorBoard run as ``tag -> [[step, value], ...]``, as TensorBoard shows it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [[event.step, round(event.value, 6)] for event in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
    }


def device_name(device: torch.device) -> str:
    """The accelerator's marketing name, or the CPU's model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


def _record(config: Path, runs: list[dict], command: str) -> dict:
    """One version's line of the table: per-seed estimates and their summary."""
    header = read_header(config)

    def summary(split: str) -> dict:
        values = [run[split] for run in runs]
        return {"mean": round(statistics.fmean(values), 4), "min": min(values), "max": max(values)}

    return {
        "config": config.as_posix(),
        "target": header["target"],
        "steps": runs[0]["steps"],
        "seeds": runs,
        "val": summary("val"),
        "train": summary("train"),
        "wall_s": round(statistics.fmean(run["wall_s"] for run in runs), 1),
        "device": runs[0]["device"],
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "python": sys.version.split()[0],
        "command": command,
    }
