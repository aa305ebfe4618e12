"""SynthSAEBench benchmark: the cached model's fingerprint, shared samples, a tiny run end to end."""

from __future__ import annotations

import csv
import dataclasses
import warnings

import pytest
import torch

from benchmarks.synth_sae_bench.config import PROTOCOLS, VARIANTS, Protocol, Variant, model_config
from benchmarks.synth_sae_bench.model import SeededBatches, fingerprint, load_or_build, sample_pool
from benchmarks.synth_sae_bench.run import (
    COLUMNS,
    Pool,
    _ablated,
    _as_batchtopk,
    _train_saelens,
    run_benchmark,
    write_markdown,
)

TINY = Protocol("tiny", 64, 16, 2, 32, (4, 8, 16, 32), (3,), 4096, (0, 1), 512, batch_size=128)


def test_full_protocol_is_synthsaebench_16k():
    cfg = model_config(PROTOCOLS["full"]).to_dict()
    assert (cfg["num_features"], cfg["hidden_dim"], cfg["seed"], cfg["bias"]) == (16384, 768, 42, 0.5)
    assert cfg["hierarchy"]["total_root_nodes"] == 128 and cfg["hierarchy"]["branching_factor"] == 4
    assert cfg["hierarchy"]["max_depth"] == 3 and cfg["hierarchy"]["scale_children_by_parent"] is True
    assert cfg["correlation"]["rank"] == 25 and cfg["orthogonalization"]["num_steps"] == 100
    full = PROTOCOLS["full"]
    assert (full.width, full.matryoshka_widths, full.l0s, full.samples) == (4096, (128, 512, 2048, 4096), (25, 20),
                                                                            200_000_000)


def test_cached_model_is_checked_on_load(tmp_path):
    built = load_or_build(TINY, tmp_path)
    again = load_or_build(TINY, tmp_path)
    assert fingerprint(again) == fingerprint(built)
    assert torch.equal(again.feature_dict.feature_vectors, built.feature_dict.feature_vectors)
    # a changed feature dictionary is refused, not silently used
    folder = next(p for p in tmp_path.iterdir() if p.is_dir())
    from safetensors.torch import load_file, save_file

    weights_file = next(folder.glob("*.safetensors"))
    weights = load_file(weights_file)
    weights["feature_vectors"] = weights["feature_vectors"] * 1.001
    save_file(weights, weights_file)
    with pytest.raises(RuntimeError, match="fingerprint"):
        load_or_build(TINY, tmp_path)
    with pytest.raises(RuntimeError, match="another configuration"):
        load_or_build(dataclasses.replace(TINY, root_nodes=3), tmp_path)


def test_every_sae_sees_the_same_batches(tmp_path):
    model = load_or_build(TINY, tmp_path)
    hidden, feats = sample_pool(model, 300, 1, tmp_path / "pool.pt", batch_size=128)
    assert hidden.shape == (300, 16) and feats.shape == (300, 64)
    # the hidden activations are the feature dictionary applied to the stored features
    assert torch.allclose(model.feature_dict(feats.to_dense()), hidden, atol=1e-5)
    again, _ = sample_pool(model, 300, 1, tmp_path / "pool.pt")
    assert torch.equal(again, hidden)
    pool = Pool(hidden, 128, 2, "cpu")
    first, second = list(pool), list(pool)
    assert pool.steps == 4 and all(torch.equal(a, b) for a, b in zip(first, second))
    seeded = SeededBatches(model, 32, 3, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(seeded, seeded))


def test_saelens_variants_take_config_fields_and_a_geometric_median_start(tmp_path, monkeypatch):
    """SAELens' SAEs configured like this package's: decoder_init_norm=1.0 gives unit decoder rows
    and W_enc = W_dec.T; b_dec_init="geometric_median" sets b_dec as the trainers do (Weiszfeld on
    the first batch); the default keeps SAELens' zero b_dec and its 0.1 decoder norm."""
    from matryoshka_plugin.trainers.common import geometric_median

    model = load_or_build(TINY, tmp_path)
    hidden, _ = sample_pool(model, 256, 1, tmp_path / "train.pt", batch_size=128)
    from sae_lens.training.sae_trainer import SAETrainer

    monkeypatch.setattr(SAETrainer, "fit", lambda self: self.sae)  # no step: the SAE as it starts
    untrained = Pool(hidden, 128, 1, "cpu")
    like_ours = Variant("x", "saelens", {"architecture": "matryoshka", "use_matryoshka_aux_loss": True,
                                         "decoder_init_norm": 1.0, "b_dec_init": "geometric_median"})
    sae = _train_saelens(TINY, like_ours, 3, 0, untrained)
    assert sae.cfg.decoder_init_norm == 1.0 and sae.cfg.use_matryoshka_aux_loss
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(32), atol=1e-5)
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    assert torch.allclose(sae.b_dec, geometric_median(hidden[:128]), atol=1e-6)
    published = _train_saelens(TINY, VARIANTS["saelens-matryoshka"], 3, 0, untrained)
    assert torch.allclose(published.W_dec.norm(dim=1), torch.full((32,), 0.1), atol=1e-6)
    assert torch.equal(published.b_dec, torch.zeros(16))
    monkeypatch.undo()  # two real steps: unit_decoder keeps the rows at norm 1, without it they drift
    pool = Pool(hidden, 128, 1, "cpu")
    held = _train_saelens(TINY, VARIANTS["saelens-matryoshka+unit-decoder"], 3, 0, pool)
    assert torch.allclose(held.W_dec.norm(dim=1), torch.ones(32), atol=1e-5)
    free = _train_saelens(TINY, VARIANTS["saelens-matryoshka+unit-init"], 3, 0, pool)
    assert not torch.allclose(free.W_dec.norm(dim=1), torch.ones(32), atol=1e-5)
    with pytest.raises(ValueError, match="b_dec_init"):
        _train_saelens(TINY, Variant("y", "saelens", {"architecture": "batchtopk", "b_dec_init": "mean"}), 3, 0,
                       untrained)


class _Oracle(torch.nn.Module):
    """A perfect SAE for the eval: its decoder is the true feature dictionary and its code is the
    true feature activations (handed out in the order the eval samples them), so F1, MCC,
    uniqueness and explained variance are 1 by construction."""

    def __init__(self, model, features: torch.Tensor):
        super().__init__()
        self.feature_dict, self.features, self.at = model.feature_dict, features.to_dense(), 0
        self.W_dec = torch.nn.Parameter(model.feature_dict.feature_vectors.detach().clone())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        code = self.features[self.at : self.at + x.shape[0]]
        self.at += x.shape[0]
        return code

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        return self.feature_dict(code)


def _random_sae(width: int, seed: int = 0):
    """SAELens' BatchTopK SAE with random weights: what an SAE that learned nothing scores."""
    from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

    torch.manual_seed(seed)
    return BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(k=3, d_in=TINY.hidden_dim, d_sae=width))


def test_scores_of_a_perfect_and_a_random_sae(tmp_path):
    """The eval wiring against answers known without it: the true dictionary with the true code
    scores 1 everywhere; random weights score far lower."""
    from benchmarks.synth_sae_bench.run import _evaluate

    model = load_or_build(TINY, tmp_path)
    feats = sample_pool(model, 2048, 999, tmp_path / "eval.pt", batch_size=512)[1]
    perfect = _evaluate(_Oracle(model, feats), model, feats, "cpu")
    for metric in ("mcc", "uniqueness", "explained_variance"):
        assert perfect[metric] == pytest.approx(1.0, abs=1e-4), (metric, perfect)
    # F1 is averaged over latents; a latent whose feature never fires in the sample scores 0
    fires = feats.to_dense() > 0
    assert perfect["f1"] == pytest.approx(float(fires.any(0).float().mean()), abs=1e-6) and perfect["f1"] > 0.95
    assert perfect["dead"] == int((~fires.any(0)).sum())
    assert perfect["l0_measured"] == pytest.approx(float(fires.sum(1).float().mean()), rel=1e-6)
    rnd = _evaluate(_random_sae(TINY.width), model, feats, "cpu")
    assert rnd["mcc"] < 0.75 and rnd["f1"] < 0.3 and rnd["explained_variance"] < 0.5, rnd


def test_finished_rows_are_skipped_without_training(tmp_path, monkeypatch):
    """run_benchmark trains and scores only the (variant, L0, seed) rows missing from the CSV:
    a rerun calls no trainer and no eval and leaves the CSV as it was; after a row is removed,
    only that row is trained again."""
    calls: list[tuple[str, int, int]] = []
    _stub_training(monkeypatch, calls)  # each row's "dead" is the number of SAEs trained so far
    variants = [VARIANTS[n] for n in ("saelens-batchtopk", "matryoshka", "matryoshka+detach")]
    csv_path = tmp_path / "results.csv"
    args = (TINY, "tiny", variants, None, None, None, tmp_path / "saes", csv_path, (0, 1), (3, 4))
    first = run_benchmark(*args)
    expected = sorted((v.name, l0, s) for l0 in (3, 4) for v in variants for s in ((0, 1) if v.main else (0,)))
    assert sorted(calls) == expected and len(first) == len(expected)
    written = csv_path.read_text()

    calls.clear()
    assert run_benchmark(*args) == [] and calls == []
    assert csv_path.read_text() == written

    lines = written.splitlines(keepends=True)
    dropped = next(i for i, line in enumerate(lines) if line.startswith("tiny,matryoshka,matryoshka_plugin,4,1,"))
    csv_path.write_text("".join(lines[:dropped] + lines[dropped + 1:]))
    again = run_benchmark(*args)
    assert calls == [("matryoshka", 4, 1)] and [(r["sae"], r["l0"], r["seed"]) for r in again] == calls
    with csv_path.open() as f:
        assert sorted((r["sae"], int(r["l0"]), int(r["seed"])) for r in csv.DictReader(f)) == expected


def _stub_training(monkeypatch, calls: list):
    """run_benchmark with its trainers and eval replaced by stubs that record what they are asked."""
    import benchmarks.synth_sae_bench.run as bench

    class Stub:
        def save_inference_model(self, path):
            pass

    def fake(p, v, l0, seed, pool, folder=None, checkpoint_every=None):
        calls.append((v.name, l0, seed))
        return Stub()

    monkeypatch.setattr(bench, "_train_ours", fake)
    monkeypatch.setattr(bench, "_train_saelens", fake)
    monkeypatch.setattr(bench, "_evaluate", lambda *a: dict(l0_measured=3.0, f1=0.5, mcc=0.6, uniqueness=0.7,
                                                             explained_variance=0.8, dead=len(calls)))


def test_a_torn_last_csv_line_is_dropped_and_that_sae_trained_again(tmp_path, monkeypatch):
    """An append cut short (what an interrupted earlier version left) no longer stops the
    benchmark: the partial row is dropped with a warning and its SAE trained again; a malformed
    line elsewhere still raises, naming it."""
    from benchmarks.synth_sae_bench.run import read_rows

    calls: list = []
    _stub_training(monkeypatch, calls)
    variants = [VARIANTS["matryoshka"]]
    csv_path = tmp_path / "results.csv"
    args = (TINY, "tiny", variants, None, None, None, tmp_path / "saes", csv_path, (0, 1, 2), (3,))
    run_benchmark(*args)
    whole = csv_path.read_bytes()
    last = whole.rstrip(b"\r\n").rsplit(b"\n", 1)[1]
    assert last.startswith(b"tiny,matryoshka,matryoshka_plugin,3,2,")
    for cut in (len(last) - 1, len(last) // 2, 3):  # the last row cut short at three points
        csv_path.write_bytes(whole[: len(whole) - len(last) - 2 + cut])
        calls.clear()
        with pytest.warns(UserWarning, match="cut short"):
            again = run_benchmark(*args)
        assert calls == [("matryoshka", 3, 2)] and [(r["sae"], r["seed"]) for r in again] == [("matryoshka", 2)]
        rows = read_rows(csv_path)
        assert [(r["sae"], r["seed"]) for r in rows] == [("matryoshka", "0"), ("matryoshka", "1"), ("matryoshka", "2")]
        assert csv_path.read_bytes().endswith(b"\r\n")
    # a header cut short: no rows yet
    csv_path.write_text("protocol,sae,sou")
    with pytest.warns(UserWarning, match="cut short"):
        assert read_rows(csv_path) == []
    # damage that is not a torn append is reported, not skipped
    lines = whole.split(b"\r\n")
    lines[1] = lines[1].split(b",", 4)[0]
    csv_path.write_bytes(b"\r\n".join(lines))
    with pytest.raises(ValueError, match="results.csv line 2 is malformed"):
        run_benchmark(*args)


def test_results_are_replaced_whole(tmp_path, monkeypatch):
    """The CSV (one more row) and the markdown are written to a temporary file and renamed into
    place: a reader that opened the old file reads it whole and unchanged, never a file being
    written (an append or a truncating write would show in its handle), and no temporary file
    is left."""
    import benchmarks.synth_sae_bench.run as bench

    calls: list = []
    _stub_training(monkeypatch, calls)
    csv_path, md = tmp_path / "results.csv", tmp_path / "results.md"
    args = (TINY, "tiny", [VARIANTS["matryoshka"]], None, None, None, tmp_path / "saes", csv_path, (0,), (3,))
    run_benchmark(*args)
    before = csv_path.read_bytes()
    row = dict(protocol="tiny", sae="x", source="s", l0=3, seed=0, f1=0.1, mcc=0.2, uniqueness=0.3,
               explained_variance=0.4, dead=0)
    with csv_path.open("rb") as reader:
        bench._append(csv_path, row)
        assert reader.read() == before
    assert csv_path.read_bytes() == before + b"tiny,x,s,3,0,0.1,0.2,0.3,0.4,0\r\n"

    md.write_text("old results\n" * 1000)
    with md.open() as reader:
        write_markdown(csv_path, md, {}, "# results")
        assert reader.read() == "old results\n" * 1000
    text = md.read_text()
    assert text.startswith("# results\n") and "| matryoshka | matryoshka_plugin | 0 |" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "results.md"]


def test_markdown_footer_follows_the_tables(tmp_path, monkeypatch):
    calls: list = []
    _stub_training(monkeypatch, calls)
    csv_path, md = tmp_path / "results.csv", tmp_path / "results.md"
    run_benchmark(TINY, "tiny", [VARIANTS["matryoshka"]], None, None, None, tmp_path / "saes", csv_path, (0,), (3,))
    write_markdown(csv_path, md, {}, "# results")
    plain = md.read_text()
    write_markdown(csv_path, md, {}, "# results", footer="\n### hedging\n")
    assert md.read_text() == plain + "\n### hedging\n"


@pytest.mark.slow
def test_tiny_benchmark_end_to_end(tmp_path, capsys, monkeypatch):
    """Every variant kind trains, exports and is scored on the tiny model, one CSV row each, and
    each row holds the scores of the SAE left on disk; a rerun trains nothing. 16 steps test the
    plumbing, not the quality (the scores themselves are checked against known answers in
    test_scores_of_a_perfect_and_a_random_sae; skipping in test_finished_rows_are_skipped_without_training;
    resuming an SAE from its checkpoint in the bit-for-bit test below)."""
    import benchmarks.synth_sae_bench.run as bench
    from benchmarks.synth_sae_bench.run import _evaluate

    model = load_or_build(TINY, tmp_path)
    hidden, _ = sample_pool(model, 2048, 1, tmp_path / "train.pt", batch_size=512)
    feats = sample_pool(model, 512, 999, tmp_path / "eval.pt", batch_size=512)[1]
    variants = [VARIANTS[n] for n in ("saelens-batchtopk", "matryoshka", "matryoshka+all", "matryoshka+detach")]
    csv_path, md = tmp_path / "docs" / "results.csv", tmp_path / "docs" / "results.md"
    pool = Pool(hidden, 128, 1, "cpu")
    rows = run_benchmark(TINY, "tiny", variants, model, pool, feats, tmp_path / "saes", csv_path, (0, 1), (3,))
    # main variants with both seeds, the others with the first
    assert sorted((r["sae"], r["seed"]) for r in rows) == [
        ("matryoshka", 0), ("matryoshka", 1), ("matryoshka+all", 0), ("matryoshka+all", 1), ("matryoshka+detach", 0),
        ("saelens-batchtopk", 0), ("saelens-batchtopk", 1)]
    for r in rows:
        assert 0 <= r["f1"] <= 1 and 0 <= r["mcc"] <= 1 and 0 <= r["uniqueness"] <= 1 and r["dead"] >= 0
    from sae_lens import SAE

    # the row is the score of the exported SAE (read back from disk and scored again)
    exported = SAE.load_from_disk(str(tmp_path / "saes" / "matryoshka-l03-s1" / "saelens"), device="cpu")
    again = _evaluate(exported, model, feats, "cpu")
    row = next(r for r in rows if (r["sae"], r["seed"]) == ("matryoshka", 1))
    assert {k: row[k] for k in ("f1", "mcc", "uniqueness", "explained_variance", "dead")} == {
        k: (round(again[k], 4) if isinstance(again[k], float) else again[k])
        for k in ("f1", "mcc", "uniqueness", "explained_variance", "dead")}
    with csv_path.open() as f:
        assert next(csv.reader(f)) == COLUMNS
    # rerunning trains nothing
    for name in ("_train_ours", "_train_saelens"):
        monkeypatch.setattr(bench, name, lambda *a, **k: pytest.fail("a finished row was trained again"))
    written = csv_path.read_text()
    assert run_benchmark(TINY, "tiny", variants, model, pool, feats, tmp_path / "saes", csv_path, (0, 1), (3,)) == []
    assert csv_path.read_text() == written
    write_markdown(csv_path, md, {"matryoshka": "fixed groups"}, "# results")
    text = md.read_text()
    assert "### tiny, L0 = 3" in text and "| matryoshka | matryoshka_plugin | 0,1 |" in text


def test_hedging_per_parent_against_a_direct_computation(tmp_path):
    from sae_lens import StandardSAE, StandardSAEConfig

    from benchmarks.synth_sae_bench.hedging import hedging_per_parent, parents_and_children

    model = load_or_build(TINY, tmp_path)
    pairs = parents_and_children(model.hierarchy)

    def walk(node):  # the hierarchy's own serialisation, read independently
        kids = [c["feature_index"] for c in node["children"]]
        return ([(node["feature_index"], kids)] if kids else []) + [x for c in node["children"] for x in walk(c)]

    assert sorted(x for r in model.hierarchy.to_dict()["roots"] for x in walk(r)) == pairs
    F = model.feature_dict.feature_vectors.detach()
    parents = [p for p, _ in pairs]
    # an SAE whose latent i is parent i's direction plus 0.5 of its first child's
    sae = StandardSAE(StandardSAEConfig(d_in=16, d_sae=len(parents)))
    with torch.no_grad():
        rows = torch.stack([F[p] + 0.5 * F[kids[0]] for p, kids in pairs])
        sae.W_dec.copy_(rows)
        sae.W_enc.copy_(rows.T)
        sae.b_enc.fill_(-1e9)  # never fires: absorption 1 wherever a parent is seen with a child
    hidden, feats = sample_pool(model, 2000, 3, tmp_path / "h.pt", batch_size=500)
    got = hedging_per_parent(sae, F, pairs, hidden, feats)
    Fn = F / F.norm(dim=1, keepdim=True)
    want = []
    for p, kids in pairs:
        w = F[p] + 0.5 * F[kids[0]]
        best = (F[p] / F[p].norm()) @ (rows / rows.norm(dim=1, keepdim=True)).T
        assert int(best.argmax()) == parents.index(p)
        want.append(float(((w / w.norm()) @ Fn[kids].T).mean()))
    assert got["hedging"] == pytest.approx(sum(want) / len(want), abs=1e-5) and got["hedging"] > 0.05
    assert got["absorption"] == 1.0 and got["parents"] == len(pairs)


@pytest.mark.slow
def test_logsparsity_variant_end_to_end(tmp_path):
    """The log-sparsity variant trains MatryoshkaLogSparsityTrainer, with its controller at the
    protocol's L0, exports it and writes a scored row; the exported SAE fires near the target."""
    import json

    model = load_or_build(TINY, tmp_path)
    hidden, _ = sample_pool(model, 2048, 1, tmp_path / "train.pt", batch_size=512)
    feats = sample_pool(model, 512, 999, tmp_path / "eval.pt", batch_size=512)[1]
    csv_path = tmp_path / "docs" / "results.csv"
    pool = Pool(hidden, 128, 16, "cpu")  # 256 steps: the controller starts after 51
    rows = run_benchmark(TINY, "tiny", [VARIANTS["logsparsity"]], model, pool, feats, tmp_path / "saes", csv_path,
                         (0,), (3,))
    assert [(r["sae"], r["seed"], r["l0"]) for r in rows] == [("logsparsity", 0, 3)]
    row = rows[0]
    assert 0 < row["f1"] <= 1 and 0 <= row["mcc"] <= 1 and row["dead"] >= 0
    config = json.loads((tmp_path / "saes" / "logsparsity-l03-s0" / "train" / "trainer_0" / "config.json").read_text())
    assert config["trainer"]["trainer_class"] == "MatryoshkaLogSparsityTrainer"
    assert config["trainer"]["target_l0"] == 3 and config["trainer"]["dead_feature_threshold"] == TINY.dead_window * 128
    assert 2.0 <= row["l0_measured"] <= 4.0  # the controller steers to 3 (2.4 measured at this size)
    with csv_path.open() as f:
        assert [(r["sae"], r["l0"]) for r in csv.DictReader(f)] == [("logsparsity", "3")]


def _tiny_trainer(cls: type, seed: int = 0, **options):
    return cls(steps=10, activation_dim=16, dict_size=32, k=3, group_fractions=[0.125, 0.125, 0.25, 0.5], lr=3e-4,
               warmup_steps=0, seed=seed, device="cpu", b_dec_init="zeros", matryoshka_aux_loss=True, **options)


def _tiny_batch(tmp_path) -> torch.Tensor:
    model = load_or_build(TINY, tmp_path)
    return sample_pool(model, 128, 1, tmp_path / "x.pt", batch_size=128)[0]


def test_encoder_gain_scales_the_encoder_at_step_0():
    from matryoshka_plugin import MatryoshkaBatchTopKTrainer

    base = _tiny_trainer(MatryoshkaBatchTopKTrainer)
    low = _tiny_trainer(_ablated(MatryoshkaBatchTopKTrainer, encoder_gain=0.01, recon_scale=None, grad_clip=True))
    assert torch.allclose(low.ae.W_enc, 0.01 * base.ae.W_enc, rtol=1e-6, atol=0)
    assert torch.equal(low.ae.W_dec, base.ae.W_dec) and torch.equal(low.ae.b_enc, base.ae.b_enc)
    assert low.trainer_class_name == "MatryoshkaBatchTopKTrainer"
    assert _ablated(MatryoshkaBatchTopKTrainer, None, None, True) is MatryoshkaBatchTopKTrainer


def test_recon_scale_multiplies_the_reconstruction_gradient(tmp_path):
    from matryoshka_plugin import MatryoshkaBatchTopKTrainer

    x = _tiny_batch(tmp_path)
    grads = []
    for cls in (MatryoshkaBatchTopKTrainer, _ablated(MatryoshkaBatchTopKTrainer, None, 4.0, True)):
        t = _tiny_trainer(cls)
        out = t._forward(x, 0, training=True)
        scale = 1.0 if cls is MatryoshkaBatchTopKTrainer else 4.0
        # no latent is dead at step 0, so the AuxK term is 0 and the loss is the scaled reconstruction
        assert float(out.loss.detach()) == pytest.approx(scale * float(out.recon.loss.detach()), rel=1e-6)
        out.loss.backward()
        grads.append({n: q.grad.clone() for n, q in t.ae.named_parameters() if q.grad is not None})
    assert grads[0].keys() == grads[1].keys() and {"W_enc", "W_dec"} <= grads[0].keys()
    for name in grads[0]:
        assert torch.allclose(grads[1][name], 4.0 * grads[0][name], rtol=1e-5, atol=1e-7), name


def test_grad_clip_false_hands_adam_the_unclipped_gradient(tmp_path):
    from matryoshka_plugin import MatryoshkaBatchTopKTrainer
    from matryoshka_plugin.trainers.common import project_out_radial_

    x = 30.0 * _tiny_batch(tmp_path)  # a gradient far above the clipping norm of 1
    reference = _tiny_trainer(MatryoshkaBatchTopKTrainer)
    reference._forward(x, 0, training=True).loss.backward()
    project_out_radial_(reference.ae.W_dec.grad, reference.ae.W_dec)
    unclipped = {n: q.grad.clone() for n, q in reference.ae.named_parameters() if q.grad is not None}
    assert torch.linalg.vector_norm(torch.stack([g.norm() for g in unclipped.values()])) > 10
    for cls, clipped in ((MatryoshkaBatchTopKTrainer, True), (_ablated(MatryoshkaBatchTopKTrainer, None, None, False),
                                                                False)):
        t = _tiny_trainer(cls)
        seen = {}
        t.optimizer.register_step_pre_hook(  # after the benchmark's hook: what Adam steps with
            lambda *_: seen.update({n: q.grad.clone() for n, q in t.ae.named_parameters() if q.grad is not None}))
        t.update(0, x)
        assert seen.keys() == unclipped.keys()
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in seen.values()]))
        if clipped:
            assert float(norm) == pytest.approx(1.0, abs=1e-4)
        else:
            for name, g in unclipped.items():
                assert torch.allclose(seen[name], g, rtol=1e-5, atol=1e-6), name


def test_batchtopk_scoring_keeps_k_per_sample_on_average():
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    torch.manual_seed(0)
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=16, d_sae=32))
    with torch.no_grad():
        for q in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec):
            q.copy_(torch.randn_like(q))
        sae.threshold.fill_(1e9)  # the threshold rule would fire nothing
    btk = _as_batchtopk(sae, 3)
    x = torch.randn(64, 16)
    with torch.no_grad():
        acts = btk.encode(x)
        assert int((acts > 0).sum()) == 3 * 64 and int((sae.encode(x) > 0).sum()) == 0
        pre = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    assert torch.allclose(acts[acts > 0], pre[acts > 0])
    assert float(pre[acts == 0].max()) <= float(acts[acts > 0].min())  # the batch's top 3 * 64


def test_protocol_label_names_the_model_and_the_passes():
    cpu = PROTOCOLS["cpu"]
    assert cpu.label(262144, 4, "e1f6a4b72ee4") == "cpu:4k-d256-w1024@e1f6a4b7:262144x4:dw100"
    assert cpu.label(1048576) == "cpu:4k-d256-w1024:1048576:dw100"
    assert PROTOCOLS["full"].label(200_000_000, 1, "ab" * 32, dead_window=500) == \
        "full:16k-d768-w4096@abababab:200000000:dw500"


def test_a_build_that_differs_from_the_committed_model_is_reported(tmp_path):
    expected = fingerprint(load_or_build(TINY, tmp_path / "a"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_or_build(dataclasses.replace(TINY, fingerprint=expected), tmp_path / "b")  # the same model: silent
    with pytest.warns(UserWarning, match="not the 00000000"):
        load_or_build(dataclasses.replace(TINY, fingerprint="0" * 64), tmp_path / "c")


def test_sources_reenter_at_a_batch(tmp_path):
    """Pool and SeededBatches hand out from batch N exactly what a full pass hands out there, and
    report how many batches the current pass has handed out (what train() checkpoints)."""
    model = load_or_build(TINY, tmp_path)
    hidden = torch.randn(5 * 8, 16)
    for source in (Pool(hidden, 8, 3, "cpu"), SeededBatches(model, 8, 15, seed=2)):
        full = list(source)
        assert len(full) == 15 and source.state_dict() == {"batch": 15}
        source.load_state_dict({"batch": 6})
        it = iter(source)
        rest = [next(it) for _ in range(4)]
        assert all(torch.equal(a, b) for a, b in zip(rest, full[6:10]))
        assert source.state_dict() == {"batch": 10}
        assert torch.equal(next(iter(source)), full[0])  # a restored position is used once
        with pytest.raises(ValueError, match="outside"):
            source.load_state_dict({"batch": 16})


class _Interrupt(Exception):
    pass


class _InterruptedPool(Pool):
    """A pool whose pass stops once, with an exception, when batch ``stop_at`` is due."""

    def __init__(self, *args, stop_at: int):
        super().__init__(*args)
        self.stop_at = stop_at

    def from_step(self, start):
        for i, x in enumerate(super().from_step(start), start):
            if i == self.stop_at and self.stop_at is not None:
                self.stop_at = None
                raise _Interrupt
            yield x


@pytest.mark.slow
@pytest.mark.parametrize("name", ["matryoshka+zeros+beta0.25", "saelens-matryoshka"])
def test_an_interrupted_sae_continues_from_its_checkpoint_bit_for_bit(tmp_path, name):
    """An SAE killed mid-training (this package's trainer, SAELens' trainer) continues from its
    newest checkpoint, on the data from that batch, and ends with the weights of an uninterrupted run."""
    from benchmarks.synth_sae_bench.run import _train_ours
    from matryoshka_plugin.resume import RunCheckpoints

    model = load_or_build(TINY, tmp_path)
    hidden, _ = sample_pool(model, 2048, 1, tmp_path / "train.pt", batch_size=512)
    v = VARIANTS[name]

    def run(pool, folder):
        with torch.random.fork_rng():
            if v.source == "saelens":
                return _train_saelens(TINY, v, 3, 0, pool, folder, checkpoint_every=5)
            return _train_ours(TINY, v, 3, 0, pool, folder, checkpoint_every=5)

    whole = run(Pool(hidden, 128, 2, "cpu"), tmp_path / "whole")  # 32 steps
    broken = _InterruptedPool(hidden, 128, 2, "cpu", stop_at=23)
    with pytest.raises(_Interrupt):
        run(broken, tmp_path / "broken")
    if v.source == "saelens":
        assert [p.name for p in RunCheckpoints(tmp_path / "broken" / "checkpoints").complete()] == \
            ["step_000000020", "step_000000015"]
        (tmp_path / "broken" / "checkpoints" / "step_000000020" / "trainer_state.pt").write_bytes(b"truncated")
        with pytest.warns(UserWarning, match="unreadable SAELens checkpoint"):
            resumed = run(broken, tmp_path / "broken")  # from step 15: step 20's files are damaged
    else:
        assert sorted(p.name for p in (tmp_path / "broken" / "train" / "resume").iterdir()) == ["step_000000015", "step_000000020"]
        resumed = run(broken, tmp_path / "broken")
    for q in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(resumed, q), getattr(whole, q)), q


def test_f1_figure_shows_every_sae_ranked_with_its_seeds(tmp_path):
    from benchmarks.synth_sae_bench.figure import plot_f1

    csv_path = tmp_path / "results.csv"
    rows = [("a", "matryoshka", "matryoshka_plugin", 0, 0.30), ("a", "matryoshka", "matryoshka_plugin", 1, 0.20),
            ("a", "saelens-matryoshka", "saelens", 0, 0.10), ("a", "logsparsity", "matryoshka_plugin", 0, 0.40),
            ("b", "matryoshka", "matryoshka_plugin", 0, 0.60)]
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for protocol, sae, source, seed, f1 in rows:
            w.writerow(dict(protocol=protocol, sae=sae, source=source, l0=12, seed=seed, f1=f1, mcc=0, uniqueness=0,
                            explained_variance=0, dead=0))
    fig = plot_f1(csv_path, tmp_path / "f1.png", protocols=["b", "a"])
    assert (tmp_path / "f1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    b, a = fig.axes
    assert a.get_title() == "a, L0 = 12" and b.get_title() == "b, L0 = 12"
    assert [t.get_text() for t in a.get_yticklabels()] == ["saelens-matryoshka", "matryoshka", "logsparsity"]
    assert [round(bar.get_width(), 6) for bar in a.patches] == [0.10, 0.25, 0.40]  # mean over seeds
    assert sorted(x for line in a.lines for x in line.get_xdata()) == [0.10, 0.20, 0.30, 0.40]  # one dot a seed
    with pytest.raises(ValueError, match="no rows"):
        plot_f1(csv_path, tmp_path / "x.png", protocols=["c"])


def test_a_variants_lr_reaches_either_trainer(tmp_path, monkeypatch):
    """``lr`` in a variant's options overrides the protocol's 3e-4: in this package's trainer
    config and in SAELens' SAETrainerConfig (constant: lr_end too)."""
    import json

    from benchmarks.synth_sae_bench.run import _train_ours
    from sae_lens.training.sae_trainer import SAETrainer

    model = load_or_build(TINY, tmp_path)
    hidden, _ = sample_pool(model, 256, 1, tmp_path / "train.pt", batch_size=128)
    pool = Pool(hidden, 128, 1, "cpu")
    _train_ours(TINY, VARIANTS["matryoshka+zeros+lr3e-3"], 3, 0, pool, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "train" / "trainer_0" / "config.json").read_text())["trainer"]
    assert config["lr"] == 3e-3 and config["b_dec_init"] == "zeros"
    _train_ours(TINY, VARIANTS["matryoshka"], 3, 0, pool, tmp_path / "default")
    assert json.loads((tmp_path / "default" / "train" / "trainer_0" / "config.json").read_text())["trainer"]["lr"] == 3e-4
    monkeypatch.setattr(SAETrainer, "fit", lambda self: self.cfg)
    cfg = _train_saelens(TINY, VARIANTS["saelens-matryoshka+unit-init+lr3e-3"], 3, 0, pool)
    assert (cfg.lr, cfg.lr_end) == (3e-3, 3e-3)
    assert _train_saelens(TINY, VARIANTS["saelens-matryoshka"], 3, 0, pool).lr == 3e-4


def test_cli_settings_and_errors(capsys, monkeypatch):
    """The command line's typed settings; bad values stop it before any model is built."""
    import benchmarks.synth_sae_bench.__main__ as cli
    from benchmarks.harness import parse_config

    a = parse_config(cli.SynthStudy, ["--protocol", "full", "--variants", "matryoshka", "saelens-matryoshka",
                                      "--seeds", "0", "1", "--l0", "12", "--checkpoint-every", "0"])
    assert (a.protocol, a.variants, a.seeds, a.l0, a.checkpoint_every) == (
        "full", ["matryoshka", "saelens-matryoshka"], [0, 1], [12], 0)
    assert a.docs == "docs/results/synth_sae_bench" and a.samples is None
    monkeypatch.setattr(cli, "load_or_build", lambda *a, **kw: pytest.fail("should not build the model"))
    with pytest.raises(SystemExit, match="--checkpoint-every must be 0"):
        cli.main(["--checkpoint-every", "-1"])
    with pytest.raises(SystemExit, match="--samples must be at least one batch"):
        cli.main(["--samples", "1"])
    with pytest.raises(SystemExit):
        cli.main(["--variants", "nope"])
    assert "invalid choice" in capsys.readouterr().err
