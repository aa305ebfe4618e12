"""Shared fixtures: offline tiny language model (nnsight-wrapped) and toy activation streams."""

from __future__ import annotations

import os
import random
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest  # noqa: E402
import torch  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

WORDS = (
    "the a cat dog bird fish sat ran flew swam on in under over mat tree house river "
    "big small red blue green quickly slowly and then because she he they ate saw liked"
).split()


def make_texts(n: int = 2000, seed: int = 0) -> list[str]:
    """Local text: short sentences over a small vocabulary (no downloads)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) for _ in range(n)]


@pytest.fixture(scope="session")
def tiny_lm():
    """A 2-layer GPT-2 built from a config, a word-level tokenizer trained in memory, and
    nnsight 0.3's LanguageModel around them."""
    from nnsight import LanguageModel
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    texts = make_texts()
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "[BOS]"]))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]")
    cfg = GPT2Config(vocab_size=hf_tok.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).eval()
    return LanguageModel(model, tokenizer=hf_tok), texts


def cycle(items):
    while True:
        yield from items


def low_rank_stream(d: int = 24, n_true: int = 96, batch: int = 256, density: float = 0.04, seed: int = 0):
    """Endless batches of sparse combinations of fixed random directions (learnable by an SAE).

    The directions are the same for every ``seed``; ``seed`` only changes the samples.
    """
    dirs = torch.randn(n_true, d, generator=torch.Generator().manual_seed(12345))
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    gen = torch.Generator().manual_seed(seed)
    while True:
        on = (torch.rand(batch, n_true, generator=gen) < density).float()
        mags = 0.5 + torch.rand(batch, n_true, generator=gen)
        yield (on * mags) @ dirs
