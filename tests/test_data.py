"""The tokenizer and the lecture's random block sampling."""

from __future__ import annotations

import pytest
import torch

from nanogpt_pl.data import CharDataModule, CharTokenizer
from nanogpt_pl.errors import UsageError


def test_tokenizer_round_trips_non_ascii_text():
    text = "Ünïcødé — 漢字 and émojis 🙂\nline two"
    tok = CharTokenizer.from_text(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == len(set(text))


def test_vocabulary_is_sorted_and_deterministic():
    assert CharTokenizer.from_text("cabbage").chars == "abceg"
    assert CharTokenizer.from_text("gabbace").chars == CharTokenizer.from_text("cabbage").chars


def test_unknown_characters_are_named():
    with pytest.raises(UsageError, match="'z'"):
        CharTokenizer("abc").encode("abz")


def datamodule(path, **kwargs) -> CharDataModule:
    dm = CharDataModule(data_path=str(path), **{"block_size": 8, "batch_size": 4, **kwargs})
    dm.setup("fit")
    return dm


def test_targets_are_inputs_shifted_by_one(small_text):
    dm = datamodule(small_text)
    x, y = dm.sample("train", 3, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (12, 8)
    assert torch.equal(x[:, 1:], y[:, :-1])
    text = small_text.read_text()
    for row_x, row_y in zip(x, y):  # x and its next character form one contiguous piece of the text
        assert dm.tokenizer.decode(row_x.tolist() + row_y[-1:].tolist()) in text


def test_splits_never_mix(tmp_path):
    # The first 90% uses only "a" and "b", the last 10% only "x" and "y".
    path = tmp_path / "two_halves.txt"
    path.write_text("ab" * 450 + "xy" * 50)
    dm = datamodule(path)
    g = torch.Generator().manual_seed(0)
    train_chars = set(dm.tokenizer.decode(torch.cat(dm.sample("train", 50, g)).flatten().tolist()))
    val_chars = set(dm.tokenizer.decode(torch.cat(dm.sample("val", 50, g)).flatten().tolist()))
    assert train_chars == {"a", "b"} and val_chars == {"x", "y"}


def test_sampling_covers_the_whole_split(tmp_path):
    # With a split barely longer than a block, the lecture's offsets reach both ends.
    path = tmp_path / "digits.txt"
    path.write_text("0123456789" * 10)
    dm = datamodule(path, block_size=4, batch_size=64)
    x, y = dm.sample("train", 10, torch.Generator().manual_seed(0))
    assert x[:, 0].min() == dm._splits["train"][0] and y[:, -1].max() == 9


def test_eval_requests_total_eval_iters_per_split(small_text):
    dm = datamodule(small_text, eval_iters=7)
    requests = dm._eval_requests()
    for split in ("train", "val"):
        assert sum(r.n_batches for r in requests if r.split == split) == 7


def test_sampler_state_restores_the_same_batches(small_text):
    dm = datamodule(small_text)
    state = dm.state_dict()
    first = dm.sample("train", 1, dm._generators["train"])
    other = CharDataModule(data_path=str(small_text), block_size=8, batch_size=4)
    other.load_state_dict(state)
    assert torch.equal(other.sample("train", 1, other._generators["train"])[0], first[0])


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "not found"),
        ("", "is empty"),
        ("abc" * 5, "fewer than block_size"),
        (b"\xff\xfe\x00bad", "not UTF-8"),
    ],
    ids=["missing", "empty", "too-short", "not-utf8"],
)
def test_bad_data_files_fail_with_one_line(tmp_path, content, message):
    path = tmp_path / "data.txt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(UsageError, match=message) as info:
        CharDataModule(data_path=str(path), block_size=8).setup("fit")
    assert "\n" not in str(info.value)
