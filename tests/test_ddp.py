"""Distributed training through Lightning's DDP, as two CPU processes talking over gloo.

One uninterrupted 2-process run is the reference; a 2-process and a single-process resume from its
mid-run checkpoint must continue it. Every process records what it trained and evaluated on
(``tests/ddp_probe.py``), so the tests compare processes with each other and with what was logged.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO, SHAKESPEARE, run_cli
from nanogpt_pl.data import CharDataModule
from nanogpt_pl.errors import UsageError
from nanogpt_pl.module import GPTModule

STEPS, EVAL_EVERY, RESUME_STEP = 24, 12, 12
EVAL_ITERS = 5  # odd: the two processes evaluate 3 and 2 batches of each split

DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]


def fit(cwd: Path, *args: str, record: str):
    result = run_cli(
        "fit", "--config", str(REPO / "configs" / "v6.yaml"),
        "--data.data_path", str(cwd / "small.txt"),
        "--data.eval_iters", str(EVAL_ITERS),
        "--trainer.val_check_interval", str(EVAL_EVERY),
        "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks+=tests.ddp_probe.Recorder", "--trainer.callbacks.out_dir", record,
        *args, cwd=cwd,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = sorted((cwd / record).glob("rank*.pt"))
    return result, [torch.load(path) for path in records]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The reference 2-process run, then a 2-process and a 1-process resume from its step-12 checkpoint."""
    cwd = tmp_path_factory.mktemp("ddp")
    (cwd / "small.txt").write_text(SHAKESPEARE.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    # Every checkpoint kept, so the mid-run one stays available for the resumes.
    ref, ref_records = fit(cwd, *DDP, "--trainer.max_steps", str(STEPS), "--checkpoint.save_top_k", "-1", record="ref")
    log_dir = cwd / "tb_logs" / "v6" / "version_0"
    (mid,) = (log_dir / "checkpoints").glob(f"step{RESUME_STEP}-*.ckpt")
    _, ddp_records = fit(cwd, *DDP, "--trainer.max_steps", str(STEPS), "--ckpt_path", str(mid), record="ddp_resume")
    single, single_records = fit(
        cwd, "--trainer.accelerator", "cpu", "--trainer.max_steps", str(RESUME_STEP + 4),
        "--ckpt_path", str(mid), record="single_resume",
    )
    return SimpleNamespace(
        cwd=cwd, log_dir=log_dir, ref=ref, ref_records=ref_records, ddp_records=ddp_records,
        single=single, single_records=single_records,
    )


def eval_losses(record: dict, step: int, split: str) -> list[float]:
    return [e["loss"] for e in record["eval_losses"] if e["step"] == step and e["split"] == split]


def test_ddp_fit_finishes_logs_and_checkpoints_once(runs):
    assert [r["world_size"] for r in runs.ref_records] == [2, 2]
    # Process 0 alone writes: one run directory, one config, one copy of each checkpoint.
    assert sorted(p.name for p in (runs.cwd / "tb_logs" / "v6").iterdir()) == ["version_0", "version_1", "version_2"]
    checkpoints = sorted(p.name for p in (runs.log_dir / "checkpoints").iterdir())
    assert len(checkpoints) == 3 and "last.ckpt" in checkpoints, checkpoints
    assert (runs.log_dir / "config.yaml").is_file()
    events = EventAccumulator(str(runs.log_dir)).Reload()
    assert len(events.Scalars("val/loss")) == STEPS // EVAL_EVERY
    assert len(list(runs.log_dir.glob("events.out.tfevents.*"))) == 1


def test_processes_draw_different_blocks(runs):
    rank0, rank1 = (r["train_batches"] for r in runs.ref_records)
    assert sorted(rank0) == sorted(rank1) == list(range(STEPS))
    for step in range(STEPS):
        assert not torch.equal(rank0[step], rank1[step]), f"both processes trained on the same blocks at step {step}"


def test_logged_estimates_are_the_mean_over_all_processes_batches(runs):
    events = EventAccumulator(str(runs.log_dir)).Reload()
    logged = {  # one value per estimate, in order
        split: dict(zip((EVAL_EVERY, STEPS), (e.value for e in events.Scalars(tag))))
        for split, tag in (("train", "train/loss_eval"), ("val", "val/loss"))
    }
    for step in (EVAL_EVERY, STEPS):
        for split in ("train", "val"):
            per_rank = [eval_losses(record, step, split) for record in runs.ref_records]
            # eval_iters batches in all, split across the processes (3 + 2), not eval_iters each.
            assert [len(losses) for losses in per_rank] == [3, 2]
            everything = per_rank[0] + per_rank[1]
            assert logged[split][step] == pytest.approx(sum(everything) / len(everything), rel=1e-5)
            # Both processes hold the same, synchronized estimate (checkpointing decides on it).
            assert runs.ref_records[0]["estimates"] == runs.ref_records[1]["estimates"]
    # The processes evaluate on different blocks too.
    assert eval_losses(runs.ref_records[0], STEPS, "val")[:2] != eval_losses(runs.ref_records[1], STEPS, "val")


def test_ddp_resume_continues_every_process_stream(runs):
    for ref, resumed in zip(runs.ref_records, runs.ddp_records):
        assert sorted(resumed["train_batches"]) == list(range(RESUME_STEP, STEPS))
        for step in range(RESUME_STEP, STEPS):
            assert torch.equal(resumed["train_batches"][step], ref["train_batches"][step]), step
        assert resumed["estimates"][-1]["val"] == pytest.approx(ref["estimates"][-1]["val"], rel=1e-5)


def test_ddp_checkpoint_resumes_single_process_and_generates(runs):
    # Process 0 continues its own stream; the note says the checkpoint came from 2 processes.
    (resumed,) = runs.single_records
    assert resumed["world_size"] == 1
    for step in range(RESUME_STEP, RESUME_STEP + 4):
        assert torch.equal(resumed["train_batches"][step], runs.ref_records[0]["train_batches"][step]), step
    note = "written by 2 process(es) and this run has 1: the saved streams of processes 1 and up go unused"
    assert note in runs.single.stderr
    # Single process evaluates all eval_iters batches itself.
    assert len(eval_losses(resumed, RESUME_STEP + 4, "val")) == EVAL_ITERS

    ckpt = torch.load(runs.log_dir / "checkpoints" / "last.ckpt", weights_only=True)
    vocab = ckpt["CharDataModule"]["vocab"]
    module = GPTModule.load_from_checkpoint(runs.log_dir / "checkpoints" / "last.ckpt", map_location="cpu").eval()
    start = torch.tensor([[vocab.index("\n")]])
    out = module.model.generate(start, max_new_tokens=40, generator=torch.Generator().manual_seed(0))
    text = "".join(vocab[i] for i in out[0].tolist())
    assert len(text) == 41 and text.startswith("\n")


# -- the sampling streams and the split of evaluation, in one process ---------------------------
def attached(dm: CharDataModule, rank: int, world_size: int) -> CharDataModule:
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world_size)
    return dm


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_eval_batches_split_across_processes_add_up_to_eval_iters(small_text, world_size):
    # batch 64 x block 256 caps a forward pass at 4 batches, so shares span several requests.
    for eval_iters in (world_size, 9, 200):
        shares = []
        for rank in range(world_size):
            dm = CharDataModule(small_text, block_size=256, batch_size=64, eval_iters=eval_iters)
            attached(dm, rank, world_size)
            requests = dm._eval_requests()
            assert {r.split for r in requests} == {"train", "val"}
            shares.append({split: sum(r.n_batches for r in requests if r.split == split) for split in ("train", "val")})
        for split in ("train", "val"):
            counts = [share[split] for share in shares]
            assert sum(counts) == eval_iters and max(counts) - min(counts) <= 1, counts


def test_fewer_eval_iters_than_processes_is_a_usage_error(small_text):
    dm = attached(CharDataModule(small_text, block_size=8, eval_iters=2), 0, 4)
    with pytest.raises(UsageError, match="data.eval_iters .2. is smaller than the number of processes .4."):
        dm.setup("fit")


def test_resume_with_another_process_count_keeps_saved_streams_by_rank(small_text):
    torch.manual_seed(1337)
    saved = [attached(CharDataModule(small_text, block_size=8), rank, 2) for rank in range(2)]
    for dm in saved:
        dm.setup("fit")
        dm.sample("train", generator=dm._generators["train"])  # advance past the fresh state
    rank_generators = [{name: g.get_state() for name, g in dm._generators.items()} for dm in saved]
    state = {"vocab": saved[0].tokenizer.chars, "generators": rank_generators[0], "rank_generators": rank_generators}

    # Three processes: 0 and 1 continue their saved streams, 2 keeps the fresh one setup seeded.
    for rank in range(3):
        dm = attached(CharDataModule(small_text, block_size=8), rank, 3)
        dm.setup("fit")
        fresh = dm._generators["train"].get_state()
        with pytest.warns(UserWarning, match="processes 2 and up start fresh sampling streams"):
            dm.load_state_dict(state)
        expected = rank_generators[rank]["train"] if rank < 2 else fresh
        assert torch.equal(dm._generators["train"].get_state(), expected)
