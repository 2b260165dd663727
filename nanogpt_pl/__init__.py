"""nanogpt_pl: the "Let's build GPT" progression, from a bigram table to a Transformer, on PyTorch Lightning."""

from nanogpt_pl.data import CharDataModule, CharTokenizer
from nanogpt_pl.model import GPT, GPTConfig
from nanogpt_pl.module import GPTModule

__all__ = ["GPT", "GPTConfig", "GPTModule", "CharDataModule", "CharTokenizer"]
__version__ = "0.1.0"
