"""One path per statistic: single-process trainers reduce through a collective too (issue 27, item 3)."""

import ast
import pathlib

import torch

import matryoshka_plugin.trainers as trainers_package
from matryoshka_plugin import MatryoshkaBatchTopKTrainer, MatryoshkaLogSparsityTrainer
from matryoshka_plugin.distributed import LocalCollective

D, N = 16, 64


def _none_tests(source: str) -> list[int]:
    """Lines comparing ``collective`` (or the ``dp`` alias) with None."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Is, ast.IsNot)) for op in node.ops):
            names = [node.left, *node.comparators]
            named = any(
                (isinstance(n, ast.Name) and n.id in ("collective", "dp"))
                or (isinstance(n, ast.Attribute) and n.attr == "collective")
                for n in names
            )
            if named and any(isinstance(n, ast.Constant) and n.value is None for n in names):
                lines.append(node.lineno)
    return lines


def test_no_trainer_branches_on_a_missing_collective():
    folder = pathlib.Path(trainers_package.__file__).parent
    found = {p.name: _none_tests(p.read_text()) for p in sorted(folder.glob("*.py"))}
    assert not any(found.values()), f"'collective is None' twins left: {found}"
    # the check itself finds such a branch
    assert _none_tests("if collective is None:\n    pass\nif self.collective is not None:\n    pass\n") == [1, 3]


def test_nothing_in_the_package_branches_on_a_missing_collective():
    """The encoder's selection too: one process selects through ``distributed.LOCAL``."""
    package = pathlib.Path(trainers_package.__file__).parents[1]
    found = {str(p.relative_to(package)): _none_tests(p.read_text()) for p in sorted(package.rglob("*.py"))}
    assert not any(found.values()), f"'collective is None' twins left: {found}"


def test_batch_topk_encode_selects_through_its_collective():
    from matryoshka_plugin.sparse_encoder import batch_topk_encode, batch_topk_select, dense_pre_activations

    g = torch.Generator().manual_seed(0)
    x, W, b_enc, b_dec = (torch.randn(*s, generator=g) for s in ((32, D), (D, N), (N,), (D,)))
    rec = Recording()
    default = batch_topk_encode(x, W, b_enc, b_dec, 4)
    recorded = batch_topk_encode(x, W, b_enc, b_dec, 4, collective=rec)
    assert rec.calls == ["keep_global_top"]
    pre = dense_pre_activations(x - b_dec, W, b_enc, torch.float32)
    flat = batch_topk_select(pre, 4 * 32)  # the single-process selection, taken directly
    for enc in (default, recorded):
        assert torch.equal(enc.pre_activations, pre)
        assert torch.equal(enc.latents.rows() * N + enc.latents.indices, flat)
        assert torch.equal(enc.latents.values.detach(), pre.reshape(-1)[flat])


class Recording(LocalCollective):
    """The identity collective, noting every reduction a trainer asks for."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def _note(self, name, t):
        self.calls.append(name)
        return t

    def sum_(self, t):
        return self._note("sum_", t)

    def max_(self, t):
        return self._note("max_", t)

    def min_(self, t):
        return self._note("min_", t)

    def gather_rows(self, t):
        return self._note("gather_rows", t)

    def batch_mean(self, t):
        self.calls.append("batch_mean")
        return super().batch_mean(t)

    def batch_variance(self, r):
        self.calls.append("batch_variance")
        return super().batch_variance(r)

    def average_gradients_(self, params):
        self.calls.append("average_gradients_")

    def keep_global_top(self, scores, local_top, count):
        self.calls.append("keep_global_top")
        return super().keep_global_top(scores, local_top, count)


def _batches(n, B=32):
    return [torch.randn(B, D, generator=torch.Generator().manual_seed(s)) for s in range(n)]


def test_a_user_built_trainer_defaults_to_the_local_collective():
    t = MatryoshkaBatchTopKTrainer(steps=10, activation_dim=D, dict_size=N, k=4, layer=0, lm_name="toy",
                                   group_fractions=[0.25, 0.75], device="cpu", seed=0)
    assert isinstance(t.collective, LocalCollective) and t.collective.world_size == 1
    assert isinstance(t.update(0, _batches(1)[0]), float)


def test_batch_top_k_statistics_go_through_the_collective():
    kw = dict(steps=20, activation_dim=D, dict_size=N, k=4, layer=0, lm_name="toy", group_fractions=[0.25, 0.75],
              warmup_steps=2, device="cpu", seed=0, threshold_start_step=0, dead_feature_threshold=32,
              b_dec_init="mean", reorder_by="frequency")
    plain, recorded = MatryoshkaBatchTopKTrainer(**kw), MatryoshkaBatchTopKTrainer(**kw)
    rec = Recording()
    recorded.bind_collective(rec)
    for step, x in enumerate(_batches(6)):
        assert plain.update(step, x) == recorded.update(step, x)  # bit for bit: the identity changes nothing
    assert recorded.dead_features > 0  # the AuxK variance was computed
    assert {"sum_", "max_", "min_", "gather_rows", "batch_variance", "average_gradients_",
            "keep_global_top"} <= set(rec.calls), sorted(set(rec.calls))
    for name in ("W_enc", "W_dec", "b_dec", "threshold"):
        assert torch.equal(getattr(plain.ae, name), getattr(recorded.ae, name)), name
    assert torch.equal(plain.num_tokens_since_fired, recorded.num_tokens_since_fired)
    assert plain.effective_l0 == recorded.effective_l0 and plain.pre_norm_auxk_loss == recorded.pre_norm_auxk_loss


def test_log_sparsity_statistics_go_through_the_collective():
    kw = dict(steps=20, activation_dim=D, dict_size=N, target_l0=4, warmup_steps=2, device="cpu", seed=0,
              normalize_input=True, reorder_latents=True, resample_dead=True, dead_feature_threshold=32)
    plain, recorded = MatryoshkaLogSparsityTrainer(**kw), MatryoshkaLogSparsityTrainer(**kw)
    rec = Recording()
    recorded.bind_collective(rec)
    for step, x in enumerate(_batches(6)):
        assert plain.update(step, x) == recorded.update(step, x)
    assert {"sum_", "max_", "batch_mean", "average_gradients_"} <= set(rec.calls), sorted(set(rec.calls))
    for name, p in plain.ae.state_dict().items():
        assert torch.equal(p, recorded.ae.state_dict()[name]), name
    assert plain.effective_l0 == recorded.effective_l0 and plain.input_norm == recorded.input_norm
