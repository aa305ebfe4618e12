"""SAEBench evals for this package's SAEs, dictionary_learning's, and any SAELens SAE.

    from matryoshka_plugin.saebench import run_saebench
    run = run_saebench(
        {"matryoshka_k40": "runs/x/trainer_0", "batchtopk_k40": "runs/x/trainer_1",
         "exported": "saelens/matryoshka-16k"},
        "eval_results", evals=["core", "absorption", "sparse_probing", "scr", "tpp"],
        device="cuda",
    )
    run.rows()          # one dict of headline metrics per SAE

What it hands SAEBench
======================
Every SAE is given to SAEBench as a stock SAELens ``SAE`` object, named by you:

* a ``trainer_i`` folder written by ``trainSAE`` (this package's trainers, or dictionary_learning's
  BatchTopK / TopK / standard / Matryoshka trainers) is exported once with
  :func:`matryoshka_plugin.export_to_saelens` into ``<output_dir>/saelens/<name>`` (re-exported
  only when ``ae.pt`` changes) and loaded with ``SAE.load_from_disk``;
* a SAELens folder (``cfg.json``) is loaded as is;
* ``("saelens", release, sae_id)`` or the string ``"saelens:RELEASE:SAE_ID"`` is a SAE from
  SAELens' pretrained directory (SAEBench's published suites), loaded with
  ``SAE.from_pretrained`` and ``fold_W_dec_norm()`` as SAEBench does for its own string ids;
* a SAELens ``SAE`` object is used as is.

The model name, hook, layer and widths come from the SAEs' own metadata, so they are checked
before anything is loaded: an unknown eval name, a missing folder, SAEs for another model or hook
than asked for, absorption on a non-residual hook, and unknown eval-config fields raise
:class:`SAEBenchError` before the language model is loaded.

How the evals run
=================
``absorption``, ``sparse_probing``, ``sparse_probing_sae_probes``, ``scr``, ``tpp`` and
``meta_structure`` run through SAEBench's own ``run_eval`` (one SAE per call) and ``core``
through ``sae_bench.evals.core.main.multiple_evals``
(core has no ``run_eval``); results are SAEBench's JSON files, in SAEBench's layout:
``<output_dir>/<eval>/<name>_custom_sae_eval_results.json``. On top of that the adapter

* loads the language model **once** (with SAEBench's own call,
  ``HookedTransformer.from_pretrained_no_processing(model_name, device=, dtype=llm_dtype)``) or
  takes the one you pass as ``model=``, and makes every eval use it instead of loading its own;
* lets you serve SAEBench's data sets locally with ``load_dataset=`` (a replacement for
  ``datasets.load_dataset`` used by SAEBench's dataset readers and by the SAELens
  ``ActivationsStore`` that the core eval reads its text with);
* keeps every cache under ``<output_dir>/artifacts/<eval>/<config hash>`` (SAEBench's defaults are
  the current directory and its own installed package; keying by the eval config means changed
  settings never reuse stale cached activations or probes);
* writes each result atomically (SAEBench writes to a staging folder, the adapter checks the JSON
  and renames it into place), skips results that exist unless ``force=True`` so an interrupted run
  continues where it stopped, and raises instead of silently continuing when SAEBench's core eval
  swallows an exception;
* records absorption's silent no-result case: SAEBench's absorption returns ``{}`` and writes
  nothing when fewer than ``min_feats_for_eval`` first letters have a ground-truth probe with
  F1 > ``min_GT_probe_f1`` (always the case for small or random models). The adapter then writes
  ``<output_dir>/absorption/<name>_custom_sae_absorption_not_evaluated.json`` with the reason and
  the probe F1 of every letter, and reports status ``"not_evaluated"`` with no absorption metrics.
  That file counts as finished for resuming;
* adds to each absorption result whether the SAE has first-letter latents at all
  (``eval_result_unstructured["first_letter_latents"]``, :func:`letter_latents`: SAEBench's own
  k = 1 probe per letter, its F1 and decoder cosine; headline column ``letter_latent_f1``). The
  absorption score presumes such a latent: with none (F1 near 0) it is near 1 whatever the SAE;
* restores torch's grad mode after each eval (SAEBench's SCR/TPP turn gradients off globally)
  and the model tokenizer's truncation and padding sides (sae-probes changes them);
* loads no language model when only ``meta_structure`` (trained on the decoder rows) is pending;
* with ``seeds=[...]`` repeats the evals that sample (:data:`SEEDED_EVALS`) once per seed into
  ``<output_dir>/seed_<seed>/``; ``SAEBenchRun.rows()`` gives their mean, standard deviation and
  count per SAE.

Model and dataset injection replace two module attributes of SAEBench (the model loader each eval
module calls, and its ``load_dataset``) for the duration of the call, and absorption runs with
the working directory set to its artifacts folder (it writes a relative ``artifacts/`` path).
Run one ``run_saebench`` at a time per process.

Modules
=======
``references`` (what an SAE is, the checks, loading), ``configs`` (:class:`EvalConfig`, one type
for every eval), ``results`` (result files, records, comparison rows), ``patches`` (every change
made to SAEBench's behaviour), ``runners`` (one runner per eval), ``run`` (the run loop),
``meta_structure`` (SAEBench's meta-SAE on any decoder, for SAEs outside TransformerLens). Importing
this package imports none of SAEBench, SAELens or TransformerLens; they load on first use.
"""

from .configs import (
    EVAL_NAMES,
    MODEL_FREE_EVALS,
    SEEDED_EVALS,
    EvalConfig,
    check_eval_names,
    default_llm_settings,
    make_eval_config,
)
from ..errors import SAEBenchError
from .references import SAERef, check_saes, describe_sae
from .results import (
    HEADLINE_METRICS,
    EvalRecord,
    SAEBenchRun,
    add_letter_latents,
    collect_results,
    headline_row,
    letter_latents,
    mean_std,
    read_result,
    remove_results,
    result_path,
    seed_dir,
    seeded_headline,
)
from .meta_structure import decoder_meta_structure
from .run import run_saebench

__all__ = [
    "run_saebench",
    "SAEBenchError",
    "SAEBenchRun",
    "EvalRecord",
    "EVAL_NAMES",
    "MODEL_FREE_EVALS",
    "SEEDED_EVALS",
    "EvalConfig",
    "make_eval_config",
    "default_llm_settings",
    "check_eval_names",
    "SAERef",
    "describe_sae",
    "check_saes",
    "result_path",
    "read_result",
    "collect_results",
    "remove_results",
    "HEADLINE_METRICS",
    "headline_row",
    "letter_latents",
    "add_letter_latents",
    "mean_std",
    "seed_dir",
    "seeded_headline",
    "decoder_meta_structure",
]
