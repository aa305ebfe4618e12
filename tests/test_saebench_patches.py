"""matryoshka_plugin.saebench.patches on SAEBench's own functions, with small stand-ins for the
model and the data (fast; the evals on a real model are in test_saebench_smollm2.py)."""

from __future__ import annotations

import random

import pytest
import torch

import matryoshka_plugin.saebench as sb
from matryoshka_plugin.saebench.patches import NormGatedSAE, absorption_vocabulary, core_metrics

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
    with core_metrics():
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


class _SplicedModel:
    """What core's ``get_recons_loss`` calls: "logits" are the hooked activations themselves and the
    per-token loss their squared distance from the clean ones, so a test reads what the splice did."""

    def __init__(self, table: torch.Tensor):
        self.table = table

    def __call__(self, tokens, return_type="both", loss_per_token=True, **kwargs):
        x = self.table[tokens]
        return x, torch.zeros(tokens.shape)

    def run_with_hooks(self, tokens, return_type="both", fwd_hooks=(), loss_per_token=True, **kwargs):
        x = self.table[tokens]
        (name, hook), = fwd_hooks
        y = hook(x.clone(), hook=None)
        return y, (y - x).pow(2).sum(-1)


@torch.no_grad()
def test_core_max_activation_norm_passes_massive_tokens_through_and_leaves_them_out_of_the_variance():
    """Tokens whose SAE input norm exceeds max_activation_norm (attention sinks the SAE was not
    trained on) keep their activation when core splices the SAE in (SAEBench's own get_recons_loss
    runs; the stand-in model returns the spliced activations) and are not counted in the explained
    variance, which equals a brute-force value over the other evaluated tokens."""
    import sae_bench.evals.core.main as core

    originals = core.get_recons_loss, core.get_sparsity_and_variance_metrics
    torch.manual_seed(0)
    d, vocab = 16, 40
    table = torch.randn(vocab, d) + 4 * torch.randn(d)
    massive = [5, 17]
    table[massive] *= 60.0  # norms far above the rest
    threshold = 10 * float(table.norm(dim=1).median())
    assert all(float(table[i].norm()) > threshold for i in massive)
    batches = [torch.randint(0, vocab, (3, 10)) for _ in range(3)]
    for b in batches:
        b[:, 0] = 0
        b[:, 1] = massive[0]
    sae = _sae(d, 32, seed=2)
    tokens = torch.cat([b.flatten() for b in batches])
    kept = tokens[(tokens != 0) & ~torch.isin(tokens, torch.tensor(massive))]
    x = table[kept]
    expected = float(1 - (x - sae.decode(sae.encode(x))).pow(2).sum() / (x - x.mean(0)).pow(2).sum())

    with core_metrics(max_norm=threshold):
        got = _core_variance(sae, table, list(batches), {0})["explained_variance"]
        spliced = core.get_recons_loss(sae, _SplicedModel(table), batches[0], None, compute_kl=False,
                                       compute_ce_loss=True)["ce_loss_with_sae"]
    assert got == pytest.approx(expected, abs=1e-5)
    with core_metrics():  # without the limit the massive tokens count and the SAE replaces them
        assert _core_variance(sae, table, list(batches), {0})["explained_variance"] != pytest.approx(expected, abs=1e-3)
        plain = core.get_recons_loss(sae, _SplicedModel(table), batches[0], None, compute_kl=False,
                                     compute_ce_loss=True)["ce_loss_with_sae"]
    over = torch.isin(batches[0], torch.tensor(massive))
    assert torch.all(spliced[over] == 0) and torch.all(plain[over] > 1.0)
    assert torch.equal(spliced[~over], plain[~over])  # every other token: the SAE's reconstruction
    assert (core.get_recons_loss, core.get_sparsity_and_variance_metrics) == originals  # restored


@torch.no_grad()
def test_norm_gated_sae_encodes_massive_rows_to_nothing_and_decodes_them_to_their_input():
    sae = _sae(8, 16, seed=3)
    x = torch.randn(2, 5, 8)
    x[0, 1] *= 1000
    gated = NormGatedSAE(sae, max_norm=100.0)
    z = gated.encode(x)
    assert torch.all(z[0, 1] == 0) and torch.equal(z[1], sae.encode(x[1]))
    out = gated.decode(z)
    assert torch.equal(out[0, 1], x[0, 1]) and torch.allclose(out[1], sae.decode(sae.encode(x[1])))
    with pytest.raises(RuntimeError, match="encode of the same batch"):
        gated.decode(z)  # a decode without its encode
    assert gated.cfg is sae.cfg


def test_max_activation_norm_is_a_core_setting_of_the_adapter():
    make = sb.make_eval_config
    cfg = make("core", "m", llm_batch_size=4, llm_dtype="float32", overrides={"max_activation_norm": 520.0})
    assert cfg.max_activation_norm == 520.0 and "max_activation_norm" not in cfg.saebench_dict()
    assert make("core", "m", llm_batch_size=4, llm_dtype="float32").max_activation_norm is None
    with pytest.raises(sb.SAEBenchError, match="max_activation_norm"):
        make("core", "m", llm_batch_size=4, llm_dtype="float32", overrides={"max_activation_norm": -1})


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


@torch.no_grad()
def test_absorption_forward_stops_after_the_hooked_block():
    """Inside forward_to_hook_layer a run_with_cache that reads only block hooks runs the blocks up
    to the last one it reads (the later blocks' hooks never fire) and caches the same activations;
    other calls run the whole model as before."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from matryoshka_plugin.saebench.patches import forward_to_hook_layer

    cfg = HookedTransformerConfig(n_layers=3, d_model=16, d_head=4, n_heads=4, d_mlp=32, d_vocab=50, n_ctx=12,
                                  act_fn="gelu", normalization_type="LN", seed=0)
    model = HookedTransformer(cfg).eval()
    tokens = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    hook = "blocks.1.hook_resid_post"
    logits, full = model.run_with_cache(tokens, names_filter=[hook])
    ran = []
    model.blocks[2].hook_resid_pre.add_hook(lambda x, hook: ran.append(hook.name))
    with forward_to_hook_layer():
        out, cache = model.run_with_cache(tokens, names_filter=[hook])
        assert ran == [] and torch.equal(cache[hook], full[hook]) and out.shape == (2, 12, 16)
        out, _ = model.run_with_cache(tokens, names_filter=hook)  # a single name
        assert ran == [] and out.shape == (2, 12, 16)
        out, _ = model.run_with_cache(tokens, names_filter=[hook, "ln_final.hook_normalized"])
        assert ran == ["blocks.2.hook_resid_pre"] and torch.equal(out, logits)  # not only block hooks: all of it
    model.reset_hooks()
    assert HookedTransformer.run_with_cache.__name__ == "run_with_cache" and not hasattr(
        HookedTransformer.run_with_cache, "__wrapped__")


def test_sae_probes_reads_bfloat16_model_activations_as_float32(tmp_path):
    """A model run in bfloat16 leaves bfloat16 activations in sae-probes' model cache; its probes
    (scikit-learn) cannot read them. Inside float32_probe_inputs sae-probes' own reader returns them
    as float32, equal to the stored values, and a scikit-learn fit on them works."""
    import sae_probes.utils_data as data
    from sklearn.linear_model import LogisticRegression

    from matryoshka_plugin.saebench.patches import float32_probe_inputs

    folder = tmp_path / "model_activations_m"
    folder.mkdir()
    x = torch.randn(40, 6).to(torch.bfloat16)
    torch.save(x, folder / "5_hist_fig_ismale_blocks.1.hook_resid_post.pt")
    y = (torch.arange(40) % 2).numpy()
    raw = data.get_xvals("5_hist_fig_ismale", "blocks.1.hook_resid_post", "m", tmp_path)
    with pytest.raises(TypeError, match="BFloat16"):
        LogisticRegression().fit(raw, y)
    with float32_probe_inputs():
        got = data.get_xvals("5_hist_fig_ismale", "blocks.1.hook_resid_post", "m", tmp_path)
    assert got.dtype == torch.float32 and torch.equal(got, x.float())
    LogisticRegression().fit(got, y)
    assert data.get_xvals("5_hist_fig_ismale", "blocks.1.hook_resid_post", "m", tmp_path).dtype == torch.bfloat16


def test_sae_probes_texts_sorted_by_length_give_the_same_activations():
    """Inside length_sorted_probe_texts sae-probes' activation pass gets its texts sorted by token
    length (so batches pad less) and returns each text's last-token activation in file order, as
    the unsorted pass computes it."""
    import sae_probes.generate_model_activations as gen
    from saebench_local import tiny_models

    from matryoshka_plugin.saebench.patches import length_sorted_probe_texts

    model = tiny_models().tl_model
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    texts = [" ".join(rng.choice(words) for _ in range(rng.choice([1, 2, 3, 40, 90]))) for _ in range(23)]
    kwargs = dict(batch_size=4, max_seq_len=64, hook_names=["blocks.1.hook_resid_post"], max_layer=None,
                  device="cpu")
    plain = gen._process_activations(model, texts, **kwargs)
    seen = []
    original = gen._process_activations

    def spy(model, texts, *args, **kw):
        seen.append(list(texts))
        return original(model, texts, *args, **kw)

    gen._process_activations = spy
    try:
        with length_sorted_probe_texts():
            got = gen._process_activations(model, texts, **kwargs)
    finally:
        gen._process_activations = original
    lengths = gen._get_text_lengths(model, seen[0])
    assert sorted(seen[0]) == sorted(texts) and lengths == sorted(lengths) and seen[0] != texts
    for name, acts in plain.items():
        assert acts.shape == (23, 64) and got[name].shape == acts.shape
        torch.testing.assert_close(got[name], acts, rtol=1e-5, atol=1e-5)
