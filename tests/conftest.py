"""Shared fixtures (the offline tiny language model) and the offline test environment."""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import make_texts  # noqa: E402

from matryoshka_plugin.kernels import numba_available  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

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


@pytest.fixture(params=["serial", "parallel"])
def kernel_path(request, monkeypatch):
    """Run the numba kernels serially (small work, the default here) or force the parallel
    compilation with two threads (what large batches use)."""
    if not numba_available():
        yield request.param
        return
    from matryoshka_plugin.kernels import numba as kernels

    if request.param == "parallel":
        monkeypatch.setattr(kernels, "PARALLEL_MIN_WORK", 0)
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        yield request.param
        torch.set_num_threads(threads)
    else:
        monkeypatch.setattr(kernels, "PARALLEL_MIN_WORK", 1 << 62)
        yield request.param


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for the test: small matrices run far slower on two threads of a busy
    machine than on one. Modules opt in with ``pytestmark = pytest.mark.usefixtures(...)``."""
    from matryoshka_plugin.threads import cpu_threads

    with cpu_threads(1):
        yield
