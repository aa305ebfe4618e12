"""ActivationSource: nnsight activations over a text stream that resume by document offset."""

from __future__ import annotations

import itertools

import pytest
import torch

from matryoshka_plugin import ActivationSource, MatryoshkaBatchTopKTrainer, train


class CountingSource(ActivationSource):
    """Counts the documents the language model runs on."""

    model_docs = 0

    def _activations(self, texts):
        CountingSource.model_docs += len(texts)
        return super()._activations(texts)


def _source(tiny_lm, cls=ActivationSource, texts=None):
    lm, all_texts = tiny_lm
    return cls(texts if texts is not None else all_texts, lm, lm.transformer.h[0], 32, n_ctxs=40, ctx_len=32,
               refresh_batch_size=16, out_batch_size=48, seed=1)


def test_matches_the_model_and_resumes_by_document_offset(tiny_lm):
    lm, texts = tiny_lm
    first = _source(tiny_lm)
    batches = list(itertools.islice(first, 60))
    assert all(b.shape == (48, 32) for b in batches)
    # every token's activation is the model's (up to the shuffle): compare the first block's set
    n_block = int(sum(len(lm.tokenizer(t, truncation=True, max_length=32)["input_ids"]) for t in texts[:40]))
    block_tokens = torch.cat(batches)[: (n_block // 48) * 48]
    with lm.trace(texts[:40], invoker_args={"truncation": True, "max_length": 32}):
        out = lm.transformer.h[0].output.save()
        inputs = lm.inputs.save()
    hidden = out.value[0] if isinstance(out.value, tuple) else out.value
    direct = hidden[inputs.value[1]["attention_mask"] != 0]
    assert direct.shape[0] == n_block
    # each served token is one of the block's tokens (identical words at one position repeat)
    nearest = torch.cdist(block_tokens, direct).min(dim=1)
    assert float(nearest.values.max()) < 1e-3  # padding differs between the batchings

    part = _source(tiny_lm)
    head = list(itertools.islice(part, 37))
    state = part.state_dict()
    CountingSource.model_docs = 0
    resumed = _source(tiny_lm, CountingSource)
    resumed.load_state_dict(state)
    tail = list(itertools.islice(resumed, 23))
    assert all(torch.equal(a, b) for a, b in zip(head + tail, batches))
    # the model ran on one block (the current one) and the next, not on the documents before
    assert state["block_start"] > 0
    assert CountingSource.model_docs <= 2 * 40


def test_rejects_a_position_saved_with_other_settings(tiny_lm):
    lm, texts = tiny_lm
    src = _source(tiny_lm)
    next(src)
    state = src.state_dict()
    other = ActivationSource(texts, lm, lm.transformer.h[0], 32, n_ctxs=40, ctx_len=32, refresh_batch_size=16,
                             out_batch_size=64, seed=1)
    with pytest.raises(ValueError, match="out_batch_size: saved 48, now 64"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="n_ctxs must be a positive integer"):
        ActivationSource(texts, lm, lm.transformer.h[0], 32, n_ctxs=0)


class _Stop(Exception):
    pass


def _texts_until(texts, stop):
    for i, t in enumerate(texts):
        if i == stop:
            raise _Stop
        yield t


@pytest.mark.slow
def test_train_resumes_an_activation_source_exactly(tiny_lm, tmp_path):
    lm, texts = tiny_lm
    cfg = [dict(trainer=MatryoshkaBatchTopKTrainer, steps=40, activation_dim=32, dict_size=64, k=4,
                group_fractions=[0.25, 0.75], seed=0, device="cpu", warmup_steps=2, threshold_start_step=3,
                layer=0, lm_name="tiny")]
    train(_source(tiny_lm), cfg, 40, save_dir=str(tmp_path / "full"), device="cpu", progress=False)
    with pytest.raises(_Stop):
        train(_source(tiny_lm, texts=_texts_until(texts, 60)), cfg, 40, save_dir=str(tmp_path / "run"),
              device="cpu", progress=False, checkpoint_every=4)
    train(_source(tiny_lm), cfg, 40, save_dir=str(tmp_path / "run"), device="cpu", progress=False, resume=True,
          checkpoint_every=4)
    a = torch.load(tmp_path / "full" / "trainer_0" / "ae.pt")
    b = torch.load(tmp_path / "run" / "trainer_0" / "ae.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
