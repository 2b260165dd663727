"""Screenshot TensorBoard over a real training run: the picture in the README's "Monitoring" section.

Trains a config from the command line (v2 by default: about a minute on a laptop CPU) into a
scratch directory, serves its logs with a real ``tensorboard`` on a free localhost port, and has
a headless Chromium (Debian's ``chromium`` package) take the picture. Nothing is drawn by hand:
what the PNG shows is what TensorBoard shows for that run.

    python scripts/screenshot_tensorboard.py                      # writes docs/tensorboard.png
    python scripts/screenshot_tensorboard.py --config configs/v6.yaml --out /tmp/v6.png -- --trainer.max_steps 2000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TAGS = urllib.parse.quote("loss|val/perplexity|tokens_per_sec|lr-", safe="")  # a regex over tag names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(config: Path, workdir: Path, extra: list[str]) -> None:
    """The run a user would start, from a scratch directory so its logs land there."""
    data = REPO / "data" / "tinyshakespeare" / "input.txt"
    command = [sys.executable, "-m", "nanogpt_pl", "fit", "--config", str(config), "--data.data_path", str(data), *extra]
    print("+", " ".join(command), flush=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(command, cwd=workdir, env=env, check=True)


def wait_for_scalars(port: int, tag: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/scalars/tags", timeout=5) as r:
                if any(tag in tags for tags in json.load(r).values()):
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"tensorboard did not serve {tag!r} within {timeout:.0f} s")


def screenshot(url: str, out: Path, size: str, wait_ms: int) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("error: no chromium on PATH; install Debian's package: apt-get install -y chromium")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", f"--user-data-dir={profile}", f"--window-size={size}",
                # TensorBoard draws its charts from data it fetches after the page loads: let the
                # page's clock run this long before the picture is taken.
                f"--virtual-time-budget={wait_ms}",
                f"--screenshot={out}", url,
            ],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=180,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "v2.yaml")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "tensorboard.png")
    parser.add_argument("--window-size", default="1600,720")
    parser.add_argument("--wait-ms", type=int, default=15000, help="page time before the picture")
    parser.add_argument("extra", nargs="*", help="more arguments for the training run, after --")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as workdir:
        workdir = Path(workdir)
        train(args.config.resolve(), workdir, args.extra)
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(workdir / "tb_logs"),
             "--host", "127.0.0.1", "--port", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        try:
            wait_for_scalars(port, "val/loss")
            args.out.parent.mkdir(parents=True, exist_ok=True)
            # The Scalars dashboard, light theme, unsmoothed, the charts people watch side by side.
            url = f"http://127.0.0.1:{port}/?darkMode=false#scalars&_smoothingWeight=0&tagFilter={TAGS}"
            screenshot(url, args.out.resolve(), args.window_size, args.wait_ms)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
