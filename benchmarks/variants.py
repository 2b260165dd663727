"""One benchmark variant in a process of its own; prints one JSON line with what it measured.

    python benchmarks/variants.py [--steps N] [--profile N] VARIANT CONFIG [CLI overrides, e.g. --trainer.max_steps 20]

Variants that train (full protocol: max_steps steps, the loss estimate every val_check_interval
steps and at the end):
  lecture  the lecture's plain script: per-head attention, per-sample batch indexing
           (torch.stack of slices), per-batch evaluation with .item(), AdamW's default loop.
  plain    a plain loop around this project's GPT, module and data module: the same batches,
           optimizer and stacked evaluation as ``fit``, without Lightning.
  lightning  the same module and data module under a bare ``Trainer`` (no logger, checkpoints,
           progress bar or callbacks): Lightning's loop alone.
  fit      ``python -m nanogpt_pl fit --config CONFIG``, as a user runs it (logger, checkpoints).
Variants that time training steps (``--steps`` after one warm-up step, median reported;
``--profile N`` also prints torch.profiler's N most expensive operators over those steps):
  step-lecture  the lecture's formulation in fp32;
  step-fast     the fast path at the config's precision (bf16-mixed autocast for v7).

Every variant reads the config through the project's own CLI, so all see the same values. Times
start after imports: ``seconds`` is wall time, ``cpu_seconds`` the process's CPU time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nanogpt_pl.cli import cli  # noqa: E402
from nanogpt_pl.lecture import LectureGPT  # noqa: E402
from nanogpt_pl.model import GPTConfig  # noqa: E402

DATA = REPO / "data" / "tinyshakespeare" / "input.txt"


def resolve(config: str, overrides: list[str]):
    """The config as ``fit`` would run it: model, data module, trainer and the raw namespace."""
    return cli(["--config", config, "--data.data_path", str(DATA), *overrides], run=False)


def schedule(trainer):
    """Steps at which the loss is estimated: every val_check_interval, and at the last step."""
    return lambda step: step % trainer.val_check_interval == 0 or step == trainer.max_steps


# -- the lecture's script ----------------------------------------------------------------------
def lecture(parsed) -> dict:
    dm, trainer = parsed.datamodule, parsed.trainer
    batch_size, block_size, eval_iters = dm.batch_size, dm.block_size, dm.eval_iters
    lr = parsed.config["model"]["optimizer"]["init_args"]["lr"]
    device = trainer.strategy.root_device

    text = DATA.read_text(encoding="utf-8")
    chars = sorted(list(set(text)))
    stoi = {ch: i for i, ch in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n = int(0.9 * len(data))
    train_data, val_data = data[:n], data[n:]

    def get_batch(split):
        data = train_data if split == "train" else val_data
        ix = torch.randint(len(data) - block_size, (batch_size,))
        x = torch.stack([data[i : i + block_size] for i in ix])
        y = torch.stack([data[i + 1 : i + block_size + 1] for i in ix])
        return x.to(device), y.to(device)

    @torch.no_grad()
    def estimate_loss():
        out = {}
        model.eval()
        for split in ["train", "val"]:
            losses = torch.zeros(eval_iters)
            for k in range(eval_iters):
                X, Y = get_batch(split)
                logits, loss = model(X, Y)
                losses[k] = loss.item()
            out[split] = losses.mean()
        model.train()
        return out

    model = LectureGPT(GPTConfig(**parsed.model.hparams["config"])).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    due = schedule(trainer)
    for step in range(1, trainer.max_steps + 1):
        xb, yb = get_batch("train")
        logits, loss = model(xb, yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if due(step):
            losses = estimate_loss()
            print(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}", file=sys.stderr)
    return {"val": float(losses["val"])}


# -- the same protocol around this project's GPT, without Lightning ------------------------------
def plain(parsed) -> dict:
    module, dm, trainer = parsed.model, parsed.datamodule, parsed.trainer
    device = trainer.strategy.root_device
    module.to(device)
    dm.setup("fit")
    forward = module.step_model  # compiled once when model.compile is set, as in fit
    optimizer = module.configure_optimizers()
    if isinstance(optimizer, dict):  # the loop steps no schedule: its losses would not be fit's
        raise SystemExit("error: the plain variant has no learning-rate schedule; use a config without one")
    train_stream, eval_stream = dm._generators["train"], dm._generators["eval"]
    due = schedule(trainer)
    for step in range(1, trainer.max_steps + 1):
        x, y = dm.sample("train", 1, train_stream, device)
        _, loss = forward(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if due(step):
            module.model.eval()
            totals = {"train": 0.0, "val": 0.0}
            with torch.no_grad():
                for request in dm._eval_requests():
                    x, y = dm.sample(request.split, request.n_batches, eval_stream, device)
                    totals[request.split] += forward(x, y)[1] * request.n_batches
            module.model.train()
            val = float(totals["val"]) / dm.eval_iters
            print(f"step {step}: train loss {float(totals['train']) / dm.eval_iters:.4f}, val loss {val:.4f}",
                  file=sys.stderr)
    return {"val": val}


# -- Lightning's loop alone ----------------------------------------------------------------------
def lightning(parsed) -> dict:
    """The same module and data module under a bare ``Trainer``: no logger, checkpoints, progress
    bar, model summary or callbacks. Between ``plain`` and ``fit``, it splits ``fit``'s extra time
    into Lightning's own loop and what the command line adds."""
    trainer = L.Trainer(
        accelerator=parsed.trainer.accelerator, devices=1, precision=parsed.trainer.precision,
        max_steps=parsed.trainer.max_steps, val_check_interval=parsed.trainer.val_check_interval,
        check_val_every_n_epoch=None, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        gradient_clip_val=parsed.trainer.gradient_clip_val,
    )
    trainer.fit(parsed.model, parsed.datamodule)
    return {"val": float(trainer.callback_metrics["val/loss"])}


# -- the project's own command ------------------------------------------------------------------
def fit(config: str, overrides: list[str]) -> dict:
    run = cli(["fit", "--config", config, "--data.data_path", str(DATA), *overrides])
    return {"val": float(run.trainer.callback_metrics["val/loss"])}


# -- training step time -------------------------------------------------------------------------
def built_optimizer(module):
    """The module's optimizer (with ``hidden_optimizer``, the combined one), without its schedule:
    the benchmark times steps at the base learning rate."""
    built = module.configure_optimizers()
    return built["optimizer"] if isinstance(built, dict) else built


def step_time(parsed, formulation: str, steps: int, profile: int = 0) -> dict:
    """Median time of ``steps`` training steps after a warm-up step; with ``profile``, also print
    ``torch.profiler``'s table of the ``profile`` most expensive operators over the timed steps."""
    module, dm, trainer = parsed.model, parsed.datamodule, parsed.trainer
    device = trainer.strategy.root_device
    precision = str(trainer.precision) if formulation == "fast" else "32-true"
    module.to(device)
    dm.setup("fit")
    if formulation == "lecture":
        model = LectureGPT.from_gpt(module.model).train()
        optimizer = torch.optim.AdamW(model.parameters(), **parsed.config["model"]["optimizer"]["init_args"])
    else:
        model, optimizer = module.step_model, built_optimizer(module)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16-mixed" else contextlib.nullcontext()
    )
    times = []
    # The profiler, if asked for, warms up with the first step and records the timed ones.
    profiler = None
    if profile:
        schedule = torch.profiler.schedule(wait=0, warmup=1, active=steps)
        profiler = torch.profiler.profile(schedule=schedule, acc_events=True)
    with profiler or contextlib.nullcontext():
        for _ in range(1 + steps):  # the first step warms up (allocations, kernel selection, compilation)
            x, y = dm.sample("train", 1, dm._generators["train"], device)
            start = time.perf_counter()
            with autocast:
                _, loss = model(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            if profiler:
                profiler.step()
    if profiler:
        # On a GPU the kernels' own time is what limits a step; on a CPU there is only CPU time.
        sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(profiler.key_averages().table(sort_by=sort_by, row_limit=profile), file=sys.stderr)
    step = statistics.median(times[1:])
    tokens = dm.batch_size * dm.block_size
    return {"step_seconds": step, "tokens": tokens, "tokens_per_second": tokens / step, "precision": precision,
            "device": str(device), "flops_per_step": train_flops(module.model.config, tokens)}


def train_flops(config: GPTConfig, tokens: int) -> float:
    """Model FLOPs of one training step (forward + backward): 6 per parameter-token for the
    matrix multiplications, plus attention's scores and weighted sum (PaLM's appendix B count)."""
    n_params = sum(p.numel() for name, p in _matrices(config))
    attention = 12 * config.n_layer * config.n_head * config.head_dim * config.block_size
    return (6 * n_params + attention) * tokens


def newton_schulz_flops(optimizer: torch.optim.Optimizer) -> float:
    """FLOPs of one step's orthogonalization in ``torch.optim.Muon`` (0 without Muon). Each
    Newton–Schulz iteration on an m x n matrix, m <= n, forms X Xᵀ (2m²n), the m x m polynomial
    (2m³) and its product with X (2m²n): the cost follows the matrices, whatever the batch."""
    members = getattr(optimizer, "optimizers", [optimizer])  # a CombinedOptimizer's, or itself
    flops = 0
    for group in (g for member in members if isinstance(member, torch.optim.Muon) for g in member.param_groups):
        for p in group["params"]:
            m, n = sorted(p.shape)
            flops += group["ns_steps"] * (4 * m * m * n + 2 * m**3)
    return float(flops)


def _matrices(config: GPTConfig):
    from nanogpt_pl.model import GPT

    with torch.device("meta"):
        model = GPT(config)
    return [(n, p) for n, p in model.named_parameters() if "embedding" not in n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variant", choices=["lecture", "plain", "lightning", "fit", "step-lecture", "step-fast"])
    parser.add_argument("config")
    parser.add_argument("--steps", type=int, default=3, help="timed steps for step-* variants")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="step-* variants: print torch.profiler's N most expensive operators over the timed steps")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="CLI overrides, e.g. --trainer.max_steps 4")
    args = parser.parse_args()
    overrides = args.overrides
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    if args.variant == "fit":
        result = fit(args.config, overrides)
    else:
        parsed = resolve(args.config, overrides)
        if args.variant == "lecture":
            result = lecture(parsed)
        elif args.variant == "plain":
            result = plain(parsed)
        elif args.variant == "lightning":
            result = lightning(parsed)
        else:
            result = step_time(parsed, args.variant.removeprefix("step-"), args.steps, args.profile)
    result.update(seconds=time.perf_counter() - start_wall, cpu_seconds=time.process_time() - start_cpu)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
