"""matryoshka_plugin.saebench.patches on SAEBench's own functions, with small stand-ins for the
model and the data (fast; the evals on a real model are in test_saebench_smollm2.py)."""

from __future__ import annotations

import pytest
import torch

import matryoshka_plugin.saebench as sb
from matryoshka_plugin.saebench.patches import absorption_vocabulary, conventional_explained_variance

HOOK = "blocks.0.hook_resid_post"


class _TableModel:
    """``run_with_cache`` returns a fixed activation per token id (what core's loop reads)."""

    def __init__(self, table: torch.Tensor):
        self.table = table

    def run_with_cache(self, tokens: torch.Tensor, **kwargs):
        return None, {HOOK: self.table[tokens]}


class _FixedStore:
    def __init__(self, batches: list[torch.Tensor]):
        self.batches = iter(batches)

    def get_batch_tokens(self, n: int) -> torch.Tensor:
        return next(self.batches)


def _sae(d: int, n: int, seed: int):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    from sae_bench.sae_bench_utils.general_utils import _standardize_sae_cfg

    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=n, metadata=SAEMetadata(model_name="m", hook_name=HOOK)))
    _standardize_sae_cfg(sae.cfg)  # what SAEBench's loader does (hook_name, hook_layer on cfg)
    with torch.no_grad():
        for p in (sae.W_enc, sae.W_dec):
            p.copy_(torch.randn_like(p) / d**0.5)
    return sae


def _core_variance(sae, table: torch.Tensor, batches: list[torch.Tensor], ignore: set[int]) -> dict[str, float]:
    import sae_bench.evals.core.main as core

    metrics, _ = core.get_sparsity_and_variance_metrics(
        sae, _TableModel(table), _FixedStore(batches), n_batches=len(batches), compute_l2_norms=False,
        compute_sparsity_metrics=True, compute_variance_metrics=True, compute_featurewise_density_statistics=False,
        eval_batch_size_prompts=len(batches[0]), model_kwargs={}, ignore_tokens=ignore)
    return metrics


@torch.no_grad()
@pytest.mark.parametrize("scale", [1.0, 50.0])
def test_core_explained_variance_is_the_variance_about_the_mean(scale):
    """Residual streams have a large mean: SAEBench 0.6's aggregation (E||x||^2 - (mean_d E x_d^2)^2)
    credits an SAE for it and changes with the activations' scale; the patched value is
    1 - E||x - x_hat||^2 / E||x - E x||^2 over the tokens core evaluates (token 0 excluded, as core
    excludes special tokens), computed here independently."""
    torch.manual_seed(0)
    d, vocab = 16, 40
    table = scale * (torch.randn(vocab, d) + 4 * torch.randn(d))
    batches = [torch.randint(0, vocab, (3, 10)) for _ in range(3)]
    for b in batches:
        b[:, 0] = 0
    tokens = torch.cat([b.flatten() for b in batches])
    x = table[tokens[tokens != 0]]
    total = (x - x.mean(0)).pow(2).sum()

    mean_predictor = _sae(d, 8, seed=1)
    mean_predictor.W_enc.zero_()
    mean_predictor.b_dec.copy_(x.mean(0))  # reconstructs every token as the mean: explains nothing
    random_sae = _sae(d, 32, seed=2)
    random_sae.b_dec.copy_(x.mean(0))
    expected_random = float(1 - (x - random_sae.decode(random_sae.encode(x))).pow(2).sum() / total)

    before = _core_variance(mean_predictor, table, list(batches), {0})["explained_variance"]
    assert before > 0.1  # SAEBench's own value for an SAE that explains no variance
    with conventional_explained_variance():
        got = _core_variance(mean_predictor, table, list(batches), {0})
        got_random = _core_variance(random_sae, table, list(batches), {0})
    assert got["explained_variance"] == pytest.approx(0.0, abs=1e-6)
    assert got_random["explained_variance"] == pytest.approx(expected_random, abs=1e-5)
    # the rest is SAEBench's: the sparsity and the legacy formula are untouched
    assert got_random["explained_variance_legacy"] == pytest.approx(
        _core_variance(random_sae, table, list(batches), {0})["explained_variance_legacy"])
    import sae_bench.evals.core.main as core

    assert core.get_sparsity_and_variance_metrics.__name__ == "get_sparsity_and_variance_metrics"
    assert not hasattr(core.get_sparsity_and_variance_metrics, "__wrapped__")  # restored


def test_absorption_vocabulary_draws_the_same_words_whatever_the_vocabulary_order():
    import sae_bench.evals.absorption.common as common
    import sae_bench.evals.absorption.feature_absorption as fa

    class Tok:
        def __init__(self, words):
            self.vocab = {w: i for i, w in enumerate(words)}

        def convert_tokens_to_string(self, tokens):
            return "".join(tokens)

    import string

    letters = string.ascii_lowercase
    words = [f" {a}{b}" for a in letters for b in letters] + ["Cd", "x1", " ", "é"]  # 677 alphabetic
    originals = common.get_alpha_tokens, fa.get_alpha_tokens
    full = common.get_alpha_tokens(Tok(words))
    with absorption_vocabulary(300, seed=3):
        got = common.get_alpha_tokens(Tok(words))
        assert fa.get_alpha_tokens(Tok(list(reversed(words)))) == got  # probes and prompts: one sample
        assert len(full) == 677 and len(got) == 300 and len(set(got)) == 300 and set(got) <= set(full)
        # every first letter keeps enough words for SAEBench's 80/20 split to train a probe for it
        per_letter = {c: sum(w.strip()[0].lower() == c for w in got) for c in letters}
        assert min(per_letter.values()) >= 10
    with absorption_vocabulary(300, seed=4):
        assert common.get_alpha_tokens(Tok(words)) != got
    with absorption_vocabulary(None, seed=3):
        assert sorted(common.get_alpha_tokens(Tok(words))) == sorted(full)
    assert (common.get_alpha_tokens, fa.get_alpha_tokens) == originals


def test_probe_vocab_size_is_an_absorption_setting_of_the_adapter():
    make = sb.make_eval_config
    cfg = make("absorption", "m", llm_batch_size=4, llm_dtype="float32", overrides={"probe_vocab_size": 2000})
    assert cfg.probe_vocab_size == 2000 and cfg.to_dict()["probe_vocab_size"] == 2000
    assert "probe_vocab_size" not in cfg.saebench_dict()  # SAEBench's config does not get it
    assert make("absorption", "m", llm_batch_size=4, llm_dtype="float32").probe_vocab_size is None
    # the cached probes depend on the words they were trained on
    keys = {make("absorption", "m", llm_batch_size=4, llm_dtype="float32", overrides=o).cache_key()
            for o in ({}, {"probe_vocab_size": 2000}, {"probe_vocab_size": 3000})}
    assert len(keys) == 3
    assert make("absorption", "m", llm_batch_size=4, llm_dtype="float32",
                overrides={"probe_vocab_size": 260}).probe_vocab_size == 260
    for bad in (0, 10, 259, 2.5, True, "all"):
        with pytest.raises(sb.SAEBenchError, match="probe_vocab_size"):
            make("absorption", "m", llm_batch_size=4, llm_dtype="float32", overrides={"probe_vocab_size": bad})
    with pytest.raises(sb.SAEBenchError, match="unknown core settings"):
        make("core", "m", llm_batch_size=4, llm_dtype="float32", overrides={"probe_vocab_size": 2000})
