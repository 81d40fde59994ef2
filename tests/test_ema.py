"""EMA schedule vs the torch reference's transcription of util/ema_pytorch.py EMA.update (torch_ref/train.py) and a
hand-written table."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flowfeat_jax import settings
from flowfeat_jax.torch_ref import train as torch_ref
from flowfeat_jax.train import ema

TOL = 1e-4


def _tree(module):
    return {name: jnp.asarray(p.detach().numpy().copy()) for name, p in module.named_parameters()}


@pytest.mark.parametrize("beta,after,every", [(0.999, 1, 5), (0.9, 10, 5), (0.99, 1, 1), (0.5, 0, 3), (1.0, 1, 5)])
def test_ema_matches_torch_transcription_over_40_steps(beta, after, every):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    cfg = settings.EmaConfig(enabled=True, beta=beta, update_after_step=after, update_every=every, power=2 / 3,
                             inv_gamma=1.0)
    reference = torch_ref.EmaTeacher(model, cfg)
    ema_tree = _tree(reference.model)
    update = jax.jit(ema.ema_update, static_argnames=("beta", "update_after_step", "update_every"))
    actions = []
    for k in range(1, 41):
        with torch.no_grad():  # an "optimiser step"
            for p in model.parameters():
                p.add_(0.5 * torch.randn_like(p))
        ref_decay = reference.update(model)
        actions.append("copy" if ref_decay == 0.0 else "skip" if ref_decay == 1.0 else "lerp")
        ema_tree, decay = update(
            ema_tree, _tree(model), jnp.int32(k), beta=beta, update_after_step=after, update_every=every
        )
        assert abs(float(decay) - ref_decay) <= 1e-6, (k, action, float(decay), ref_decay)
        for name, value in _tree(reference.model).items():
            np.testing.assert_allclose(np.asarray(ema_tree[name]), np.asarray(value), atol=TOL, rtol=0, err_msg=f"{k}")
    assert "lerp" in actions or beta == 1.0


def test_released_schedule_table():
    """(k, action, decay) written by hand from recipe step 8: copy at k=1, lerp at k = 6, 11, …, capped at 0.999."""
    table = [
        (1, "copy", 0.0),
        (2, "skip", 1.0),
        (3, "skip", 1.0),
        (5, "skip", 1.0),
        (6, "lerp", 0.6580048),  # 1 − 5^(−2/3)
        (7, "skip", 1.0),
        (10, "skip", 1.0),
        (11, "lerp", 0.7845565),  # 1 − 10^(−2/3)
        (16, "lerp", 0.8355859),
        (36, "lerp", 0.9065410),
        (31621, "lerp", 0.9989999),
        (31626, "lerp", 0.999),  # 1 − 31625^(−2/3) > 0.999: capped
        (100001, "lerp", 0.999),
        (100002, "skip", 1.0),
    ]
    ema_tree = {"w": jnp.array([1.0, -2.0]), "count": jnp.array(3, jnp.int32)}
    online_tree = {"w": jnp.array([3.0, 2.0]), "count": jnp.array(7, jnp.int32)}
    for k, action, expected in table:
        new_tree, decay = ema.ema_update(ema_tree, online_tree, k)
        assert abs(float(decay) - expected) < 1e-6, (k, float(decay), expected)
        want = {
            "copy": online_tree["w"],
            "skip": ema_tree["w"],
            "lerp": expected * ema_tree["w"] + (1 - expected) * online_tree["w"],
        }[action]
        np.testing.assert_allclose(np.asarray(new_tree["w"]), np.asarray(want), atol=1e-6, rtol=0, err_msg=f"{k}")
        assert int(new_tree["count"]) == 3  # integer leaves are not tracked, as ema_pytorch
    # Copies are exact, skips leave the tree bit-identical.
    assert np.array_equal(ema.ema_update(ema_tree, online_tree, 1)[0]["w"], online_tree["w"])
    assert np.array_equal(ema.ema_update(ema_tree, online_tree, 2)[0]["w"], ema_tree["w"])


def test_ema_decay_function():
    ks = jnp.arange(1, 8)
    expected = [0.0, 0.0] + [1 - (k - 1) ** (-2 / 3) for k in range(3, 8)]
    np.testing.assert_allclose(np.asarray(ema.ema_decay(ks)), expected, atol=1e-6)
    assert float(ema.ema_decay(10**9)) == pytest.approx(0.999)
    assert float(ema.ema_decay(50, beta=0.999, power=1.0, inv_gamma=2.0)) == pytest.approx(1 - (1 + 48 / 2) ** -1)
    assert float(ema.ema_decay(3, min_value=0.5)) == pytest.approx(0.5)


def test_ema_update_is_jit_safe_with_one_trace():
    traces = []

    def counted(ema_tree, online_tree, k):
        traces.append(k)  # runs at trace time only
        return ema.ema_update(ema_tree, online_tree, k)

    update = jax.jit(counted)
    ema_tree, online_tree = {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}
    decays = [float(update(ema_tree, online_tree, jnp.asarray(k, jnp.int32))[1]) for k in range(1, 12)]
    assert decays[0] == 0.0 and decays[1:5] == [1.0] * 4 and 0 < decays[5] < 1 and decays[10] > decays[5]
    assert len(traces) == 1
