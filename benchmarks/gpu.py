"""Every GPU figure of nanogpt_pl in one prepared run of a few minutes on one GPU.

GPU time is short: this script is meant to be the one command run on a borrowed GPU, and its
``--smoke`` mode (tests/test_gpu_script.py) runs the same parts on a CPU at tiny sizes, so it
cannot rot between GPU runs.

Install on a GPU machine that already has torch, lightning, torchmetrics and tensorboard, without
replacing them: ``benchmarks/gpu_bundle.sh`` builds, on any machine with pip, the wheels it lacks
(jsonargparse with its ``[signatures]`` extras, and this project) and prints the two commands::

    python -m pip install --no-deps --target .gpu_site gpu_bundle/*.whl
    PYTHONPATH=$PWD/.gpu_site python benchmarks/gpu.py --out $OUT

Other ways to run it::

    python benchmarks/gpu.py --out $OUT       # every part; the summary into $OUT (default docs/gpu/)
    python benchmarks/gpu.py --only v7,generate --out /tmp/gpu
    python benchmarks/gpu.py --smoke          # the same parts on a CPU, tiny, into a temporary folder

Only the summary goes to ``--out``, rewritten after every part so that a machine taken back mid-run
still leaves every figure measured until then: ``<device>.json`` and ``.md``, v7's ``results.json``
record and the profiler's table (``OUTPUT_LIMITS``: at most 8 files of 16 MiB, no sub-folders; the
script checks them and fails if they are exceeded). The runs (checkpoints, event files) go to a
temporary folder, whose path is printed.

Parts (``--only`` takes their names), each in its own processes and under its own time cap
(``CAPS``, 7 minutes in all): a failing part is reported with its return code, a part over its cap
as ``over_cap``, and the others still run:

- ``cuda_tests``: the CUDA-only tests (``pytest -m cuda tests/``; pytest must be installed).
- ``v7``: the full v7 run through ``reproduce`` (so v7 trains once and its record lands in
  ``<out>/reproduction/results.json`` like every other version's): wall time, final estimates,
  tokens/s and MFU from its TensorBoard scalars, peak GPU memory.
- ``v7_compile``: ``--model.compile true`` for ``COMPILE_STEPS`` steps (compile time and
  compiled throughput, not a final loss).
- ``small``: v2 and v6 full runs through ``reproduce``, wall time against the CPU's in
  docs/reproduction/results.json (the same measure: ``fit`` called to its last estimate).
- ``generate``: 500 characters from the v7 checkpoint.
- ``ddp``: ``--trainer.strategy ddp --trainer.devices 1`` for a few steps, stopped by SIGTERM after
  its first checkpoint, resumed with ``--ckpt_path last`` (NCCL, the checkpoint and random-state path).
- ``profile``: torch.profiler's top operators over a few v7 steps (``benchmarks/variants.py --profile``).

Peak GPU memory is nvidia-smi's ``memory.used`` for the whole device (CUDA context included),
sampled every 0.2 s while a part runs: a short spike between samples can be missed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from nanogpt_pl.reproduce import device_name, read_scalars  # noqa: E402

CPU_RECORDS = REPO / "docs" / "reproduction" / "results.json"
PARTS = ["cuda_tests", "v7", "v7_compile", "small", "generate", "ddp", "profile"]
# Seconds each part may take, process start-up included; 420 in all, so a 15-minute GPU window
# keeps room for the machine's start and the install. A part over its cap is stopped and recorded.
CAPS = {"cuda_tests": 30, "v7": 210, "v7_compile": 60, "small": 45, "generate": 15, "ddp": 35, "profile": 25}
COMPILE_STEPS = 300
# What may come back from a GPU machine's output folder: files, bytes per file, folder depth.
OUTPUT_LIMITS = {"files": 8, "bytes": 16 * 2**20, "depth": 1}
SMOKE_CAP = 240  # --smoke, per part: a busy CPU's process start-ups, not the GPU's budget
# --smoke: v7 and the runs derived from it shrunk to a few milliseconds a step on a CPU.
SMOKE_MODEL = {"n_embd": 32, "n_head": 2, "n_layer": 1}
SMOKE_DATA = {"block_size": 16, "batch_size": 8, "eval_iters": 2}
SMOKE_TRAINER = {"max_steps": 4, "val_check_interval": 2, "accelerator": "cpu", "precision": "32-true"}
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


class OverCap(Exception):
    """A part ran past its time cap and was stopped."""


class Failed(Exception):
    """A part's command failed; carries its return code and output tail for the report."""

    def __init__(self, command: list[str], returncode: int, output: str) -> None:
        super().__init__(f"exit code {returncode}")
        self.command, self.returncode, self.output = command, returncode, output


class MemorySampler:
    """The most GPU memory nvidia-smi saw in use while the block ran; None where there is no nvidia-smi."""

    def __init__(self) -> None:
        self.peak_mib: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=5).stdout
                used = int(out.split()[0])
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                return
            self.peak_mib = max(self.peak_mib or 0, used)

    def __enter__(self) -> "MemorySampler":
        if shutil.which("nvidia-smi") and torch.cuda.is_available():
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


class Bench:
    """The parts, sharing the output folder, the smoke switch and the v7 run's checkpoint."""

    def __init__(self, work: Path, out: Path, smoke: bool) -> None:
        self.work, self.out, self.smoke = work, out, smoke
        self.runs = work / "runs"
        self.configs = self._configs()
        self.deadline = float("inf")  # of the part running now (time.monotonic)

    # -- helpers --------------------------------------------------------------------------------
    def _configs(self) -> Path:
        """The configs the parts train: the repository's, or in smoke mode tiny copies, with v7's
        'device: gpu' header dropped so that reproduce accepts it on a CPU."""
        if not self.smoke:
            return REPO / "configs"
        folder = self.work / "smoke_configs"
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("v2", "v6", "v7"):
            config = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text(encoding="utf-8"))
            if name == "v7":
                config["model"]["config"].update(SMOKE_MODEL)
                config["data"].update(block_size=SMOKE_DATA["block_size"], batch_size=SMOKE_DATA["batch_size"])
            config["data"]["eval_iters"] = SMOKE_DATA["eval_iters"]
            config["trainer"].update(SMOKE_TRAINER)
            (folder / f"{name}.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
        return folder

    def left(self) -> float:
        """Seconds left of the running part's cap; OverCap once there are none."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise OverCap
        return left

    def run(self, command: list[str]) -> tuple[subprocess.CompletedProcess, float]:
        """Run one command from the repository root, within the part's cap; the finished process and
        its wall seconds, or Failed / OverCap."""
        print(f"  $ {' '.join(command)}", flush=True)
        start = time.perf_counter()
        try:
            done = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True,
                                  timeout=self.left())
        except subprocess.TimeoutExpired:
            raise OverCap from None
        seconds = time.perf_counter() - start
        if done.returncode:
            raise Failed(command, done.returncode, (done.stdout + done.stderr)[-3000:])
        return done, seconds

    @staticmethod
    def shown(command: list[str]) -> str:
        """A command as a reader would type it from the repository root."""
        parts = ["python" if part == sys.executable else part for part in command]
        return " ".join(str(Path(p).relative_to(REPO)) if p.startswith(str(REPO)) else p for p in parts)

    def fit(self, config: str, version: str, *extra: str) -> list[str]:
        return [sys.executable, "-m", "nanogpt_pl", "fit", "--config", str(self.configs / f"{config}.yaml"),
                "--trainer.logger.init_args.save_dir", str(self.runs),
                "--trainer.logger.init_args.version", version, *QUIET, *extra]

    @staticmethod
    def speed(log_dir: Path) -> dict:
        """Final estimates, last tokens/s and MFU (MFU only where the GPU's dense peak is known)."""
        curves = read_scalars(log_dir)
        last = {tag: values[-1][1] for tag, values in curves.items() if values}
        return {"train": last.get("train/loss"), "val": last.get("val/loss"),
                "tokens_per_sec": last.get("throughput/tokens_per_sec"), "mfu": last.get("throughput/mfu")}

    # -- parts ----------------------------------------------------------------------------------
    def cuda_tests(self) -> dict:
        if not torch.cuda.is_available():
            return {"status": "skipped", "reason": "no CUDA"}
        command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/"]
        done, seconds = self.run(command)
        return {"command": self.shown(command), "seconds": round(seconds, 1), "summary": done.stdout.strip().splitlines()[-1]}

    def v7(self) -> dict:
        out = self.work / "reproduction"
        command = [sys.executable, "-m", "nanogpt_pl", "reproduce", "--versions", "v7", "--seeds", "1337",
                   "--out", str(out), "--configs", str(self.configs)]
        with MemorySampler() as memory:
            _, seconds = self.run(command)
        record = json.loads((out / "results.json").read_text(encoding="utf-8"))["v7"]
        (self.out / "results.json").write_text(json.dumps({"v7": record}, indent=2) + "\n", encoding="utf-8")
        return {"command": self.shown(command), "process_seconds": round(seconds, 1), "wall_s": record["wall_s"],
                "steps": record["steps"], **self.speed(out / "runs" / "v7" / "seed1337"),
                "peak_memory_mib": memory.peak_mib, "target": record["target"]}

    def v7_compile(self) -> dict:
        if self.smoke:
            return {"status": "skipped", "reason": "smoke: inductor's compile alone takes over a minute on a "
                    "CPU; tests/test_compile.py covers --model.compile on a CPU"}
        command = self.fit("v7", "v7_compile", "--model.compile", "true", "--trainer.max_steps", str(COMPILE_STEPS),
                           "--trainer.val_check_interval", str(COMPILE_STEPS), "--data.eval_iters", "20")
        with MemorySampler() as memory:
            _, seconds = self.run(command)
        return {"command": self.shown(command), "process_seconds": round(seconds, 1),
                **self.speed(self.runs / "v7" / "v7_compile"), "peak_memory_mib": memory.peak_mib}

    def small(self) -> dict:
        """Through reproduce, as the CPU's records were made: the same wall-time measure on both."""
        cpu = json.loads(CPU_RECORDS.read_text(encoding="utf-8"))
        out = self.work / "reproduction"
        command = [sys.executable, "-m", "nanogpt_pl", "reproduce", "--versions", "v2,v6", "--seeds", "1337",
                   "--out", str(out), "--configs", str(self.configs)]
        _, seconds = self.run(command)
        records = json.loads((out / "results.json").read_text(encoding="utf-8"))
        result = {"command": self.shown(command), "process_seconds": round(seconds, 1)}
        for name in ("v2", "v6"):
            record = records[name]
            result[name] = {"wall_s": record["wall_s"], "steps": record["steps"], "val": record["val"]["mean"],
                            "cpu_wall_s": cpu[name]["wall_s"], "cpu_device": cpu[name]["device"],
                            "cpu_command": cpu[name]["command"], "wall_over_cpu": round(record["wall_s"] / cpu[name]["wall_s"], 3)}
        return result

    def _v7_checkpoint(self) -> Path:
        found = sorted((self.work / "reproduction" / "runs" / "v7" / "seed1337").glob("checkpoints/last*.ckpt"))
        if not found:
            raise FileNotFoundError("no v7 checkpoint: run the v7 part first (--only v7,generate)")
        return found[-1]

    def generate(self) -> dict:
        tokens = 50 if self.smoke else 500
        command = [sys.executable, "-m", "nanogpt_pl", "generate", "--ckpt_path", str(self._v7_checkpoint()),
                   "--max_new_tokens", str(tokens), "--seed", "1337"]
        done, seconds = self.run(command)
        return {"command": self.shown(command), "process_seconds": round(seconds, 1), "characters": tokens,
                "sample": done.stdout.strip()}

    def ddp(self) -> dict:
        """Stop after the first checkpoint with SIGTERM (a logging step follows within 10 steps), resume."""
        steps, every = (40, 20) if self.smoke else (200, 100)
        extra = ["--trainer.strategy", "ddp", "--trainer.devices", "1", "--trainer.max_steps", str(steps),
                 "--trainer.val_check_interval", str(every), "--trainer.log_every_n_steps", "2" if self.smoke else "10",
                 "--data.eval_iters", "2" if self.smoke else "20"]
        first = self.fit("v7", "ddp", *extra)
        last = self.runs / "v7" / "ddp" / "checkpoints" / "last.ckpt"
        shutil.rmtree(self.runs / "v7" / "ddp", ignore_errors=True)
        print(f"  $ {' '.join(first)}  (SIGTERM after {last.name} appears)", flush=True)
        process = subprocess.Popen(first, cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        try:
            while not last.exists() and process.poll() is None:
                self.left()
                time.sleep(0.05)
            signalled = process.poll() is None
            if signalled:
                process.send_signal(signal.SIGTERM)
            output, _ = process.communicate(timeout=self.left())
        except (OverCap, subprocess.TimeoutExpired):
            process.kill()
            process.communicate()
            raise OverCap from None
        if not signalled or process.returncode != 1:  # main exits 1 after a SIGTERM stop
            raise Failed(first, process.returncode, "the run was not stopped by SIGTERM as planned\n" + output[-3000:])
        stopped_at = max(step for step, _ in read_scalars(last.parent.parent)["train/loss"])
        resume = self.fit("v7", "ddp", *extra, "--ckpt_path", "last")
        _, seconds = self.run(resume)
        final = max(step for step, _ in read_scalars(last.parent.parent)["val/loss"])
        if final != steps:
            raise Failed(resume, 0, f"resumed run ended at step {final}, not {steps}")
        return {"command": self.shown(first) + " ; kill -TERM ; " + self.shown(resume),
                "stopped_near_step": stopped_at, "resumed_to_step": final, "resume_seconds": round(seconds, 1)}

    def profile(self) -> dict:
        command = [sys.executable, str(REPO / "benchmarks" / "variants.py"), "--steps", "3" if self.smoke else "10",
                   "--profile", "15", "step-fast", str(self.configs / "v7.yaml")]
        done, seconds = self.run(command)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        table = done.stderr[done.stderr.find("---"):].strip()  # the profiler's table follows any warnings
        (self.out / "profile.txt").write_text(table + "\n", encoding="utf-8")
        return {"command": self.shown(command), "process_seconds": round(seconds, 1),
                "step_seconds": result["step_seconds"], "tokens_per_second": result["tokens_per_second"],
                "table": table}


def child_env() -> dict:
    """The environment of every command a part runs: this checkout first on PYTHONPATH, before what
    was there (wheels installed with ``pip install --target DIR`` are found through PYTHONPATH)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def check_output_limits(out: Path) -> list[str]:
    """What in ``out`` would not come back from a GPU machine (``OUTPUT_LIMITS``); empty when all would."""
    files = [p for p in out.rglob("*") if p.is_file()]
    problems = [f"{len(files)} files (at most {OUTPUT_LIMITS['files']})"] if len(files) > OUTPUT_LIMITS["files"] else []
    for path in files:
        if path.stat().st_size > OUTPUT_LIMITS["bytes"]:
            problems.append(f"{path.name}: {path.stat().st_size:,} bytes (at most {OUTPUT_LIMITS['bytes']:,})")
        if len(path.relative_to(out).parts) > OUTPUT_LIMITS["depth"]:
            problems.append(f"{path.relative_to(out)}: in a sub-folder")
    return problems


def device_info() -> dict:
    """The device the parts run on, its driver, and the versions that matter."""
    import lightning

    if torch.cuda.is_available():
        device = device_name(torch.device("cuda", 0))
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.TimeoutExpired):
            driver = None
        driver = driver or f"CUDA {torch.version.cuda} (torch's runtime)"
    else:
        device, driver = device_name(torch.device("cpu")), "none (no CUDA)"
    return {"device": device, "driver": driver, "torch": torch.__version__, "lightning": lightning.__version__,
            "python": platform.python_version()}


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def write_markdown(record: dict, path: Path) -> None:
    lines = [f"# {record['device']}", "", f"Produced by `{record['command']}`.", "",
             f"- driver: {record['driver']}", f"- torch {record['torch']}, lightning {record['lightning']}, "
             f"python {record['python']}", ""]
    for name, part in record["parts"].items():
        lines.append(f"## {name}: {part['status']}")
        if part["status"] == "skipped":
            lines += ["", f"skipped: {part['reason']}", ""]
            continue
        if part["status"] == "over_cap":
            lines += ["", f"stopped at its cap of {part['cap_s']} s", ""]
            continue
        if part["status"] == "failed":
            lines += ["", f"failed with exit code {part['returncode']}: `{part['command']}`", "", "```",
                      part["output"], "```", ""]
            continue
        figures = part["result"]
        lines += ["", f"`{figures['command']}`", ""]
        for key, value in figures.items():
            if isinstance(value, dict):  # one run of several (small: v2, v6)
                lines.append(f"- {key}: " + ", ".join(f"{k} {v}" for k, v in value.items()))
            elif key not in ("command", "table", "sample"):
                lines.append(f"- {key}: {value}")
        for key in ("table", "sample"):
            if key in figures:
                lines += ["", "```", figures[key], "```"]
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for <device>.json and .md (default docs/gpu/; --smoke: a temporary folder)")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts: {','.join(PARTS)}")
    parser.add_argument("--smoke", action="store_true", help="the same parts on a CPU at tiny sizes")
    args = parser.parse_args()
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in PARTS]
    if unknown or not chosen:
        print(f"error: unknown part(s) {', '.join(unknown) or repr(args.only)}: choose from {','.join(PARTS)}.",
              file=sys.stderr)
        sys.exit(2)
    out = args.out or (Path(tempfile.mkdtemp(prefix="gpu-smoke-")) if args.smoke else REPO / "docs" / "gpu")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-runs-"))
    info = device_info()
    for key, value in info.items():
        print(f"{key}: {value}")
    print(f"runs: {work}; summary: {out}")
    bench = Bench(work, out, args.smoke)
    command = "python benchmarks/gpu.py" + (" --smoke" if args.smoke else "") + (
        f" --only {','.join(chosen)}" if chosen != PARTS else "")
    stem = out / (slug(info["device"]) + ("-smoke" if args.smoke else ""))
    parts = {}
    for name in chosen:
        print(f"[{name}]", flush=True)
        start = time.perf_counter()
        cap = SMOKE_CAP if args.smoke else CAPS[name]
        bench.deadline = time.monotonic() + cap
        try:
            result = getattr(bench, name)()
            if result.get("status") == "skipped":
                parts[name] = {"status": "skipped", "reason": result["reason"]}
            else:
                parts[name] = {"status": "ok", "result": result}
        except OverCap:
            parts[name] = {"status": "over_cap", "cap_s": cap}
        except Failed as err:
            parts[name] = {"status": "failed", "returncode": err.returncode, "command": bench.shown(err.command),
                           "output": err.output}
        except Exception as err:  # a part's own bug or a missing file: report it, run the others
            parts[name] = {"status": "failed", "returncode": None, "command": "benchmarks/gpu.py",
                           "output": f"{type(err).__name__}: {err}"}
        parts[name]["part_seconds"] = round(time.perf_counter() - start, 1)
        state = parts[name]["status"]
        extra = parts[name].get("reason") or (f"exit code {parts[name]['returncode']}" if state == "failed" else "")
        print(f"[{name}] {state}{': ' + extra if extra else ''} ({parts[name]['part_seconds']} s)", flush=True)
        # After every part: a machine taken back in the middle still leaves what was measured.
        record = {**info, "smoke": args.smoke, "command": command, "caps_s": CAPS, "parts": parts}
        stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        write_markdown(record, stem.with_suffix(".md"))
    print(f"results: {stem.with_suffix('.json')}, {stem.with_suffix('.md')}")
    problems = check_output_limits(out)
    if problems:
        print(f"error: {out} holds what would not come back from a GPU machine: {'; '.join(problems)}", file=sys.stderr)
        sys.exit(1)
    failed = [name for name, part in parts.items() if part["status"] != "ok" and part["status"] != "skipped"]
    if failed:
        print(f"failed or over their cap: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
