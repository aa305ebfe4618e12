"""Trainer behaviour against dictionary_learning's own trainer and exact references."""

import inspect
import math

import pytest
import torch
from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer as Upstream
from helpers import brute_force

import matryoshka_plugin.trainers.common as common_module
from matryoshka_plugin import (
    ActivationError,
    MatryoshkaBatchTopKSAE,
    MatryoshkaBatchTopKTrainer,
    MatryoshkaLogSparsitySAE,
    MatryoshkaLogSparsityTrainer,
    PrefixWeights,
    TrainingError,
)
from matryoshka_plugin.sparsity import L0Controller

D, N = 16, 64
FRACTIONS = [1 / 8, 1 / 4, 5 / 8]


def btk(**kw):
    base = dict(steps=50, activation_dim=D, dict_size=N, k=4, layer=0, lm_name="toy",
                group_fractions=FRACTIONS, warmup_steps=5, device="cpu", seed=0)
    return MatryoshkaBatchTopKTrainer(**{**base, **kw})


def lst(**kw):
    base = dict(steps=50, activation_dim=D, dict_size=N, target_l0=4, warmup_steps=5, device="cpu", seed=0)
    return MatryoshkaLogSparsityTrainer(**{**base, **kw})


def data(B=64, seed=0):
    return torch.randn(B, D, generator=torch.Generator().manual_seed(seed))


def test_accepts_every_upstream_keyword():
    params = inspect.signature(Upstream.__init__).parameters
    values = dict(steps=100, activation_dim=D, dict_size=N, k=3, layer=7, lm_name="google/gemma-2-2b",
                  group_fractions=[0.25, 0.75], group_weights=[1.0, 2.0], lr=1e-3, auxk_alpha=0.05,
                  warmup_steps=10, decay_start=80, threshold_beta=0.99, threshold_start_step=20, seed=3,
                  device="cpu", wandb_name="w", submodule_name="model.layers.7")
    missing = set(params) - set(values) - {"self", "dict_class"}
    assert not missing, f"test does not cover upstream keywords {missing}"
    tr = MatryoshkaBatchTopKTrainer(**values)
    cfg = tr.config
    for key in values:
        if key not in ("seed", "device"):
            assert cfg[key] == values[key], key
    assert cfg["dict_class"] == "MatryoshkaBatchTopKSAE" and cfg["package"] == "matryoshka_plugin"
    assert tr.cfg.group_sizes == Upstream(**values).group_sizes


@pytest.mark.parametrize("weights", [None, [0.5, 1.0, 2.0]])
def test_group_loss_and_gradients_match_upstream(weights):
    ours = btk(group_weights=weights, auxk_alpha=0.0)
    up = Upstream(steps=50, activation_dim=D, dict_size=N, k=4, layer=0, lm_name="toy", group_fractions=FRACTIONS,
                  group_weights=weights, warmup_steps=5, device="cpu", auxk_alpha=0.0)
    up.ae.load_state_dict(ours.ae.state_dict())
    x = data()
    G = len(FRACTIONS)
    w = weights or [1 / G] * G
    l_ours = ours.loss(x, step=0)
    l_up = up.loss(x, step=0)
    # Ours is the weighted mean of group MSEs; upstream averages w_g * MSE_g over groups.
    factor = G / sum(w)
    assert float(l_ours) == pytest.approx(float(l_up) * factor, rel=1e-5)
    names = [n for n, _ in up.ae.named_parameters()]
    assert names == [n for n, _ in ours.ae.named_parameters()]
    g_ours = torch.autograd.grad(l_ours, list(ours.ae.parameters()))
    g_up = torch.autograd.grad(l_up * factor, list(up.ae.parameters()))
    for name, a, b in zip(names, g_ours, g_up):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_every_prefix_mode_matches_brute_force():
    tr = btk(prefix_mode="every", group_fractions=None, auxk_alpha=0.0)
    x = data()
    with torch.no_grad():
        f = tr.ae.encode(x, use_threshold=False)
        ref = brute_force(x, f, tr.ae.W_dec, tr.ae.b_dec, PrefixWeights.every_prefix(N))
        assert float(tr.loss(x, step=0)) == pytest.approx(float(ref), rel=1e-5)


def test_logging_changes_no_state():
    tr = btk(threshold_start_step=0, prefix_mode="pareto", group_fractions=None)
    for s in range(3):
        tr.update(s, data(seed=s))
    before = (float(tr.ae.threshold), tr.num_tokens_since_fired.clone(), tr.generator.get_state().clone())
    out = tr.loss(data(seed=9), step=10, logging=True)
    assert set(out.losses) >= {"l2_loss", "auxk_loss", "loss"} and out.f.shape == (64, N)
    assert float(tr.ae.threshold) == before[0]
    assert torch.equal(tr.num_tokens_since_fired, before[1])
    assert torch.equal(tr.generator.get_state(), before[2])
    ls = lst()
    ls.update(0, data())
    coeff, ema, norm = ls.controller.coefficient, ls.contribution_ema.clone(), float(ls.ae.input_norm)
    gen = ls.generator.get_state().clone()
    out = ls.loss(data(seed=3), step=1, logging=True)
    assert out.x_hat.shape == (64, D) and "sparsity_loss" in out.losses
    assert ls.controller.coefficient == coeff and float(ls.ae.input_norm) == norm
    assert torch.equal(ls.contribution_ema, ema) and torch.equal(ls.generator.get_state(), gen)


def test_effective_l0_is_measured_and_threshold_tracks_k():
    tr = btk(threshold_start_step=0, threshold_beta=0.9, lr=1e-2)
    for s in range(60):
        tr.update(s, data(seed=s))
    held_out = data(B=2048, seed=1000)
    with torch.no_grad():
        batch_topk = tr.ae.encode(held_out, use_threshold=False)
        thresholded = tr.ae.encode(held_out)
    assert 0 < tr.effective_l0 <= tr.cfg.k
    assert float((batch_topk > 0).sum(1).float().mean()) == pytest.approx(tr.cfg.k, rel=0.02)
    # The inference threshold stands in for BatchTopK: on held-out tokens it keeps about k latents.
    thr_l0 = float((thresholded > 0).sum(1).float().mean())
    assert float(tr.ae.threshold) > 0
    assert thr_l0 == pytest.approx(tr.cfg.k, rel=0.25), thr_l0
    assert tr.threshold_l0 == pytest.approx(tr.cfg.k, rel=0.35)
    assert tr.num_tokens_since_fired.device == tr.ae.W_enc.device


@pytest.mark.parametrize("make", [btk, lst])
def test_bf16_activations_train_like_fp32(make):
    """bf16 batches give the loss of the same values in fp32 (finite) and do train the SAE.
    Both trainers run their encoder matmul in bf16 then (rounding its output)."""
    ref, low = make(), make()
    low.ae.load_state_dict(ref.ae.state_dict())
    before = {k: v.clone() for k, v in low.ae.state_dict().items()}
    rel = 1e-2
    for s in range(3):
        x16 = data(seed=s).bfloat16()
        l16, l32 = low.update(s, x16), ref.update(s, x16.float())
        assert math.isfinite(l16) and l16 == pytest.approx(l32, rel=rel, abs=1e-7)
    assert low.ae.b_dec.dtype == torch.float32
    lr = low.optimizer.param_groups[0]["initial_lr"]
    got, want = _in_original_order(low), _in_original_order(ref)
    for name in ("W_enc", "W_dec", "b_enc"):
        assert not torch.equal(low.ae.state_dict()[name], before[name]), name
        # three Adam steps move each weight by at most ~3 lr: bf16 may differ by that much
        torch.testing.assert_close(got[name], want[name], atol=6 * lr + 1e-5, rtol=1.3e-6)


def _in_original_order(tr) -> dict:
    """The SAE's weights with its latents in their original order: the log-sparsity trainer
    reorders them every step, and near-tied contributions may order differently in bf16."""
    sd = tr.ae.state_dict()
    if not hasattr(tr, "latent_origin"):
        return sd
    order = torch.argsort(tr.latent_origin)
    return {"W_enc": sd["W_enc"][:, order], "W_dec": sd["W_dec"][order], "b_enc": sd["b_enc"][order]}


def test_activation_check_passes_large_finite_values_and_names_nan_inf():
    """The check's one-reduction shortcut must not reject finite batches whose sum overflows,
    nor pass a batch whose NaN and Inf would cancel in a sum (+inf + -inf = nan, still caught)."""
    from matryoshka_plugin.errors import check_activations

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        big = torch.full((4, D), torch.finfo(dtype).max / 2, dtype=dtype)
        check_activations(big, D)  # sum overflows; every value is finite
        for bad_value, name in ((float("nan"), "1 NaN"), (float("inf"), "1 Inf")):
            bad = big.clone()
            bad[2, 7] = bad_value
            with pytest.raises(ActivationError, match=rf"{name}.*row 2, dim 7"):
                check_activations(bad, D)
    both = torch.zeros(4, D)
    both[0, 0], both[1, 1] = float("inf"), float("-inf")
    with pytest.raises(ActivationError, match="0 NaN and 2 Inf"):
        check_activations(both, D)


def test_short_training_never_encodes_densely():
    tr = btk(steps=20, threshold_start_step=1000)
    for s in range(20):
        tr.update(s, data(seed=s))
    assert float(tr.ae.threshold) < 0
    f = tr.ae.encode(data(seed=99))
    assert int((f != 0).sum()) <= tr.cfg.k * 64


@pytest.mark.parametrize("make", [btk, lst])
def test_bad_activations_name_problem_and_step(make):
    tr = make()
    tr.update(0, data())
    bad = data()
    bad[3, 5] = float("nan")
    with pytest.raises(ActivationError, match=r"non-finite activations at step 1: 1 NaN.*row 3, dim 5"):
        tr.update(1, bad)
    bad[3, 5] = float("inf")
    with pytest.raises(ActivationError, match="1 Inf"):
        tr.update(1, bad)
    with pytest.raises(ActivationError, match=f"dimension mismatch at step 2: the SAE expects {D}, got 8"):
        tr.update(2, torch.randn(64, 8))
    with pytest.raises(ActivationError, match="must have shape"):
        tr.update(2, torch.randn(4, 64, D))


@pytest.mark.parametrize("make", [btk, lst])
def test_non_finite_loss_raises_and_leaves_sae_untouched(make):
    # (the log-sparsity SAE rescales its input, so huge inputs only overflow without that)
    tr = make(normalize_input=False) if make is lst else make()
    for s in range(3):
        tr.update(s, data(seed=s))
    state = {k: v.clone() for k, v in tr.ae.state_dict().items()}
    with pytest.raises(TrainingError, match="non-finite loss .* at step 3"):
        tr.update(3, data() * 1e30)
    for k, v in tr.ae.state_dict().items():
        assert torch.equal(v, state[k]), k
    tr.update(4, data(seed=4))  # training can go on with good data


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(k=0), "k must be"),
        (dict(k=N + 1), "k must be"),
        (dict(group_fractions=[0.5, 0.6]), "sum to 1"),
        (dict(group_fractions=[0.001, 0.999]), "empty"),
        (dict(group_fractions=None), "group_fractions is required"),
        (dict(group_weights=[1.0]), "group_weights"),
        (dict(warmup_steps=50), "warmup_steps"),
        (dict(decay_start=2), "decay_start"),
        (dict(prefix_mode="groups", balance_beta=1.5), "beta"),
        (dict(steps=0), "steps"),
    ],
)
def test_bad_configuration(kw, match):
    with pytest.raises(ValueError, match=match):
        btk(**kw)


def test_log_sparsity_bad_configuration():
    with pytest.raises(ValueError, match="sparsity"):
        lst(sparsity="l0")
    # group_fractions only define groups: with any other prefix mode they would be ignored.
    for mode in ("pareto", "pareto_expected", "every", "none"):
        with pytest.raises(ValueError, match=f"group_fractions apply to prefix_mode='groups', not '{mode}'"):
            lst(prefix_mode=mode, group_fractions=[0.5, 0.5])
    lst(prefix_mode="groups", group_fractions=[0.5, 0.5])
    with pytest.raises(ValueError, match="dead_feature_threshold"):
        lst(dead_feature_threshold=0)
    with pytest.raises(ValueError, match="target_l0"):
        lst(target_l0=0)
    with pytest.raises(ValueError, match="unknown prefix mode"):
        lst(prefix_mode="random")


def _train_pair(reorder_a, reorder_b, steps=30):
    # (resampling picks latents by position, so it is off here)
    a = lst(prefix_mode="none", reorder_latents=reorder_a, lr=1e-2, resample_dead=False)
    b = lst(prefix_mode="none", reorder_latents=reorder_b, lr=1e-2, resample_dead=False)
    b.ae.load_state_dict(a.ae.state_dict())
    for tr in (a, b):
        tr.ae.double()
    for s in range(steps):
        x = data(seed=s).double()
        a.update(s, x)
        b.update(s, x)
    return a, b


def test_reordering_permutes_adam_state_with_the_latents():
    """The plain (no prefix) loss is order-invariant, so reordering must not change training."""
    plain, reordered = _train_pair(False, True)
    origin = reordered.latent_origin
    assert not torch.equal(origin, torch.arange(N))  # the latents did move
    ema = reordered.contribution_ema
    assert torch.all(ema[:-1] >= ema[1:])
    torch.testing.assert_close(reordered.ae.W_dec, plain.ae.W_dec[origin], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(reordered.ae.W_enc, plain.ae.W_enc[:, origin], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(reordered.ae.b_enc, plain.ae.b_enc[origin], rtol=1e-9, atol=1e-10)


def test_reordering_without_permuting_adam_state_diverges(monkeypatch):
    """Negative control: the reference code's bug (weights only) breaks the equivalence."""
    real = common_module.permute_latents_

    def weights_only(perm, optimizer, params, statistics=()):
        real(perm, torch.optim.Adam([torch.zeros(1)]), params, statistics)

    monkeypatch.setattr(common_module, "permute_latents_", weights_only)
    plain, reordered = _train_pair(False, True)
    diff = (reordered.ae.W_dec - plain.ae.W_dec[reordered.latent_origin]).abs().max()
    assert diff > 1e-4


def test_input_norm_starts_from_first_batch():
    tr = lst()
    x = data() * 5
    tr.update(0, x)
    assert float(tr.ae.input_norm) == pytest.approx(float(x.norm(dim=1).mean()), rel=1e-5)


def test_zero_batches_do_not_skew_the_input_scale():
    tr = lst()
    tr.update(0, torch.zeros(64, D))  # says nothing about the scale
    x = data() * 5
    tr.update(1, x)
    expected = float(x.norm(dim=1).mean())
    assert float(tr.ae.input_norm) == pytest.approx(expected, rel=1e-5)
    tr.update(2, torch.zeros(64, D))
    assert float(tr.ae.input_norm) == pytest.approx(expected, rel=1e-5)
    # zero rows (padding) inside a batch do not shrink it either
    y = data(seed=1) * 5
    y[:32] = 0
    tr.update(3, y)
    new = 0.99 * expected + 0.01 * float(y[32:].norm(dim=1).mean())
    assert float(tr.ae.input_norm) == pytest.approx(new, rel=1e-5)


def test_huge_activations_raise_instead_of_an_infinite_scale():
    tr = lst()
    tr.update(0, data())
    state = {k: v.clone() for k, v in tr.ae.state_dict().items()}
    with pytest.raises(ActivationError, match=r"activations too large at step 1: the squared norm of batch row 0"):
        tr.update(1, data() * 1e20)
    for k, v in tr.ae.state_dict().items():
        assert torch.equal(v, state[k]), k
    fresh = lst()
    with pytest.raises(ActivationError, match="too large"):
        fresh.update(0, data() * 1e20)
    assert float(fresh.ae.input_norm) == 0.0 and torch.isfinite(fresh.ae(data())).all()
    tr.update(2, data(seed=2))
    assert torch.isfinite(tr.ae(data())).all() and math.isfinite(float(tr.ae.input_norm))


@pytest.mark.parametrize("make", [btk, lst])
def test_config_names_the_dict_class_used(make):
    base = MatryoshkaBatchTopKSAE if make is btk else MatryoshkaLogSparsitySAE
    custom = type("MyMatryoshkaSAE", (base,), {})
    tr = make(dict_class=custom)
    assert type(tr.ae) is custom and tr.config["dict_class"] == "MyMatryoshkaSAE"
    assert make().config["dict_class"] == base.__name__


def test_log_sparsity_dead_feature_threshold_keyword():
    tr = lst(dead_feature_threshold=128, resample_dead=False)
    with torch.no_grad():
        tr.ae.b_enc[:5] = -1e3  # these latents can never fire
    tr.update(0, data(seed=0))
    assert tr.dead_features == 0  # 64 tokens < 128
    tr.update(1, data(seed=1))
    assert tr.dead_features >= 5 and tr.config["dead_feature_threshold"] == 128
    # default: a tenth of the run's tokens
    default = lst()
    default.update(0, data())
    assert default.cfg.dead_feature_threshold == 50 * 64 // 10


def test_dead_latents_are_resampled():
    tr = lst(dead_feature_threshold=64)
    with torch.no_grad():
        tr.ae.b_enc[:5] = -1e3
    tr.update(0, data(seed=0))
    assert tr.resampled >= 5 and tr.dead_features >= 5
    # the resampled latents fire again, about target_l0 / dict_size of the time
    origin = tr.latent_origin.tolist()
    revived = [origin.index(i) for i in range(5)]
    with torch.no_grad():
        f = tr.ae.encode(data(B=4096, seed=5))
    rate = (f[:, revived] > 0).float().mean(0)
    assert torch.all(rate > 0) and torch.all(rate < 0.5), rate
    assert torch.all(tr.num_tokens_since_fired[revived] == 0)


def test_controller():
    c = L0Controller(1.0, target=10, rate=0.1, warmup_steps=4)
    assert [c.update(s, 100) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    # L0 far above target: stronger penalty, the log error clipped at 1
    assert c.update(4, 100) == pytest.approx(math.exp(0.1))
    # below: weaker, in proportion to log(L0 / target)
    assert c.update(5, 8) == pytest.approx(math.exp(0.1) * math.exp(0.1 * math.log(0.8)))
    assert c.update(6, 0) == pytest.approx(math.exp(0.1 * math.log(0.8)))
    fixed = L0Controller(0.5, target=None, rate=0.1, warmup_steps=0)
    assert fixed.update(10, 1000) == 0.5
    with pytest.raises(ValueError, match="rate"):
        L0Controller(1.0, target=10, rate=-1)


def test_default_controller_can_cross_the_range_a_short_run_needs():
    """The default rate is scaled to the run: log(coefficient) can move by controller_log_range."""
    for steps in (100, 1000, 40_000):
        tr = lst(steps=steps)
        after_warmup = steps - tr.controller.warmup_steps
        assert tr.controller.rate * after_warmup == pytest.approx(tr.cfg.controller_log_range)
        c = tr.controller
        for s in range(steps):
            c.update(s, 1e6)  # L0 far too high all along
        assert math.log(c.coefficient / tr.cfg.sparsity_coeff) == pytest.approx(tr.cfg.controller_log_range)


def test_random_prefixes_reproducible_with_seed():
    a, b = btk(prefix_mode="pareto", group_fractions=None), btk(prefix_mode="pareto", group_fractions=None)
    for s in range(5):
        assert a.update(s, data(seed=s)) == b.update(s, data(seed=s))


MODES = [
    dict(prefix_mode="groups"),
    dict(prefix_mode="groups", balance_beta=0.5),
    dict(prefix_mode="every", group_fractions=None),
    dict(prefix_mode="pareto_expected", group_fractions=None),
    dict(prefix_mode="none", group_fractions=None),
]


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(f"{k}={v}" for k, v in m.items() if v is not None))
def test_fused_training_path_matches_reference(mode):
    """Fused kernels vs plain torch: loss and every gradient (fp32), dead latents included."""
    from matryoshka_plugin.kernels import numba_available

    if not numba_available():
        pytest.skip("numba not installed")
    trainers = [btk(backend=b, top_k_aux=8, dead_feature_threshold=1, **mode) for b in ("torch", "fused")]
    trainers[1].ae.load_state_dict(trainers[0].ae.state_dict())
    x = data(B=96)
    results = []
    for tr in trainers:
        tr.num_tokens_since_fired.fill_(5)  # every latent counts as dead: AuxK is active
        loss = tr.loss(x, step=0)
        results.append((loss.detach(), *torch.autograd.grad(loss, list(tr.ae.parameters()))))
    for name, a, b in zip(["loss", "W_enc", "b_enc", "W_dec", "b_dec"], *results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def _bf16_rounded_weights(trainer):
    with torch.no_grad():
        for p in trainer.ae.parameters():
            p.copy_(p.bfloat16().float())
    return trainer


def test_bf16_step_matches_fp32_step_on_bf16_rounded_inputs():
    """bf16 activations (what trainSAE(autocast_dtype=torch.bfloat16) passes on CPU): the encoder
    matmul runs in bf16, everything else in fp32 on fp32 master weights. Reference: the same step
    in fp32 on the bf16-rounded inputs and weights; the two differ only by the rounding of the
    matmul's output (and top-k ties at the boundary)."""
    d, n, B = 48, 512, 256
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(B, d, generator=g) * 3 + 1).bfloat16()
    results = []
    for xin in (x, x.float()):
        tr = _bf16_rounded_weights(btk(activation_dim=d, dict_size=n, k=8, lr=1e-3))
        loss = tr.loss(xin)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in tr.ae.named_parameters()}
        results.append((tr, loss.detach(), grads))
    (tr_bf16, loss_bf16, g_bf16), (_, loss_ref, g_ref) = results
    assert loss_bf16 != loss_ref  # the matmul really ran in bf16 (fp32 would be bit-identical)
    assert tr_bf16.matmul_dtype == torch.bfloat16
    torch.testing.assert_close(loss_bf16, loss_ref, rtol=1e-2, atol=0)
    for name, ref in g_ref.items():
        got = g_bf16[name]
        assert got.dtype == torch.float32, name
        # relative to the whole gradient: a latent whose selection flips at a rounded tie
        # changes its own row entirely
        rel = float((got - ref).norm() / ref.norm())
        assert rel <= 5e-2, (name, rel)  # measured 0.8-2.2%
    # One update: the master weights and Adam's state stay fp32.
    tr = btk(activation_dim=d, dict_size=n, k=8)
    before = tr.ae.W_enc.detach().clone()
    for step in range(2):  # the learning rate warms up from 0
        tr.update(step, x)
    assert all(p.dtype == torch.float32 for p in tr.ae.parameters())
    assert all(v.dtype == torch.float32 for s in tr.optimizer.state.values() for v in s.values() if v.is_floating_point())
    assert not torch.equal(before, tr.ae.W_enc)


def test_log_sparsity_bf16_step_matches_fp32_step_on_bf16_rounded_inputs():
    """The log-sparsity trainer on bf16 activations: its dense encoder matmul and that matmul's
    backward run in bf16 (autocast, fp32 accumulation), the penalty, the prefix loss and the
    master weights in fp32. Reference: the fp32 step on the bf16-rounded inputs and weights."""
    d, n, B = 48, 256, 256
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(B, d, generator=g) * 3 + 1).bfloat16()
    results = []
    for xin in (x, x.float()):
        tr = _bf16_rounded_weights(lst(activation_dim=d, dict_size=n, target_l0=8))
        tr._prepare(xin, 0)
        tr._update_input_norm(xin.float())
        loss = tr.loss(xin)
        loss.backward()
        results.append((tr, loss.detach(), {name: p.grad.clone() for name, p in tr.ae.named_parameters()
                                             if p.grad is not None}))
    (tr_bf16, loss_bf16, g_bf16), (_, loss_ref, g_ref) = results
    assert tr_bf16.matmul_dtype == torch.bfloat16
    assert loss_bf16 != loss_ref  # the matmul really ran in bf16
    torch.testing.assert_close(loss_bf16, loss_ref, rtol=1e-2, atol=0)
    assert set(g_bf16) == set(g_ref) and "W_enc" in g_ref
    for name, ref in g_ref.items():
        got = g_bf16[name]
        assert got.dtype == torch.float32, name
        rel = float((got - ref).norm() / ref.norm())
        assert rel <= 3e-2, (name, rel)
    # Steps on bf16 input keep fp32 master weights and Adam state, and train.
    tr = lst(activation_dim=d, dict_size=n, target_l0=8)
    before = tr.ae.W_enc.detach().clone()
    for step in range(3):
        assert math.isfinite(tr.update(step, x))
    assert all(p.dtype == torch.float32 for p in tr.ae.parameters())
    assert all(v.dtype == torch.float32 for s in tr.optimizer.state.values() for v in s.values() if v.is_floating_point())
    assert not torch.equal(tr.ae.W_enc, before)
