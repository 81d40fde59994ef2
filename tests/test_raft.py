"""Tests for flowfeat_jax/flow/raft.py: the official key set, strict loading of DataParallel checkpoints, forward
shapes, and the average-pooled correlation pyramid against SEA-RAFT's (separately tested) one."""

import numpy as np
import pytest
import torch
from test_searaft import formula_images, formula_state

from flowfeat_jax.flow import raft, searaft


def _norm_shapes(name, channels, batch_norm):
    if not batch_norm:  # InstanceNorm2d without affine weights or running statistics has no state.
        return {}
    return {f"{name}.{p}": (channels,) for p in ("weight", "bias", "running_mean", "running_var")} | {
        f"{name}.num_batches_tracked": ()
    }


def _conv_shapes(name, out_channels, in_channels, kernel):
    kh, kw = kernel if isinstance(kernel, tuple) else (kernel, kernel)
    return {f"{name}.weight": (out_channels, in_channels, kh, kw), f"{name}.bias": (out_channels,)}


def _encoder_shapes(prefix, out_channels, batch_norm):
    """BasicEncoder keys as in searaft.md §7 (official RAFT core/extractor.py)."""
    shapes = _conv_shapes(f"{prefix}.conv1", 64, 3, 7) | _norm_shapes(f"{prefix}.norm1", 64, batch_norm)
    width = 64
    for stage, (out, stride) in enumerate(((64, 1), (96, 2), (128, 2)), start=1):
        for index in range(2):
            block = f"{prefix}.layer{stage}.{index}"
            cin = width if index == 0 else out
            shapes |= _conv_shapes(f"{block}.conv1", out, cin, 3) | _conv_shapes(f"{block}.conv2", out, out, 3)
            shapes |= _norm_shapes(f"{block}.norm1", out, batch_norm) | _norm_shapes(f"{block}.norm2", out, batch_norm)
            if index == 0 and stride != 1:
                shapes |= _norm_shapes(f"{block}.norm3", out, batch_norm)
                shapes |= _norm_shapes(f"{block}.downsample.1", out, batch_norm)
                shapes |= _conv_shapes(f"{block}.downsample.0", out, cin, 1)
        width = out
    return shapes | _conv_shapes(f"{prefix}.conv2", out_channels, 128, 1)


def official_shapes():
    shapes = _encoder_shapes("fnet", 256, batch_norm=False) | _encoder_shapes("cnet", 256, batch_norm=True)
    enc = "update_block.encoder"
    shapes |= _conv_shapes(f"{enc}.convc1", 256, 324, 1) | _conv_shapes(f"{enc}.convc2", 192, 256, 3)
    shapes |= _conv_shapes(f"{enc}.convf1", 128, 2, 7) | _conv_shapes(f"{enc}.convf2", 64, 128, 3)
    shapes |= _conv_shapes(f"{enc}.conv", 126, 256, 3)
    for gate in "zrq":
        shapes |= _conv_shapes(f"update_block.gru.conv{gate}1", 128, 384, (1, 5))
        shapes |= _conv_shapes(f"update_block.gru.conv{gate}2", 128, 384, (5, 1))
    shapes |= _conv_shapes("update_block.flow_head.conv1", 256, 128, 3)
    shapes |= _conv_shapes("update_block.flow_head.conv2", 2, 256, 3)
    shapes |= _conv_shapes("update_block.mask.0", 256, 128, 3) | _conv_shapes("update_block.mask.2", 576, 256, 1)
    return shapes


def random_dataparallel_state(seed=0):
    """What torch.save(nn.DataParallel(RAFT).state_dict()) writes: official names behind `module.`."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in official_shapes().items():
        if name.endswith("num_batches_tracked"):
            value = torch.tensor(3, dtype=torch.int64)
        elif name.endswith("running_var"):
            value = 0.5 + torch.rand(shape, generator=gen)
        else:
            value = 0.03 * torch.randn(shape, generator=gen)
        state[name] = value
    for name in state:
        if ".downsample.1." in name:
            state[name] = state[name.replace(".downsample.1.", ".norm3.")]
    return {"module." + k: v for k, v in state.items()}


@pytest.fixture(scope="module")
def sintel_pth(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "raft-sintel.pth"
    torch.save(random_dataparallel_state(), path)
    return path


@pytest.fixture(scope="module")
def raft_model(sintel_pth):
    return raft.load_raft_checkpoint(sintel_pth)


def test_module_has_the_official_179_keys():
    expected = official_shapes()
    assert len(expected) == 179
    assert {k: tuple(v.shape) for k, v in raft.Raft().state_dict().items()} == expected


def test_dataparallel_checkpoint_loads_strictly(sintel_pth, raft_model):
    state = torch.load(sintel_pth)
    assert not raft_model.training
    for name, value in raft_model.state_dict().items():
        torch.testing.assert_close(value, state["module." + name], rtol=0, atol=0)
    assert raft_model.cnet.layer2[0].downsample[1] is raft_model.cnet.layer2[0].norm3


@pytest.mark.parametrize("drop", ["module.update_block.gru.convq2.bias", "module.cnet.norm1.running_mean"])
def test_wrong_checkpoints_are_rejected(tmp_path, drop):
    state = random_dataparallel_state()
    del state[drop]
    path = tmp_path / "raft-partial.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=rf"raft-partial\.pth.*{drop.removeprefix('module.')}"):
        raft.load_raft_checkpoint(path)
    searaft_file = tmp_path / "searaft.pth"
    torch.save({"cnet.conv1.weight": torch.zeros(64, 6, 7, 7)}, searaft_file)
    with pytest.raises(ValueError, match=r"searaft\.pth.*missing"):
        raft.load_raft_checkpoint(searaft_file)


def test_forward_random_weights_and_errors(raft_model):
    gen = torch.Generator().manual_seed(1)
    image1 = 255 * torch.rand(1, 3, 125, 131, generator=gen)
    image2 = torch.roll(image1, shifts=(1, 2), dims=(2, 3))
    with torch.inference_mode():
        flow = raft_model(image1, image2, iters=2)
        with pytest.raises(ValueError, match="iters"):
            raft_model(image1, image2, iters=0)
        with pytest.raises(ValueError, match="RAFT needs H and W"):
            raft_model(image1[..., :100], image2[..., :100])
    assert flow.shape == (1, 2, 125, 131) and torch.isfinite(flow).all() and flow.abs().max() > 0


def test_matches_official_code_on_formula_weights():
    """Constants: the official princeton-vl/RAFT @2888e15 modules (test_mode, iters 6) run once on CPU with these
    weights and images (no padding needed at 128 x 136)."""
    model = raft.Raft().eval()
    model.load_state_dict(formula_state(official_shapes(), ".norm3."))
    with torch.inference_mode():
        flow = model(*formula_images(128, 136), iters=6)[0]
    torch.testing.assert_close(flow.mean(dim=(1, 2)), torch.tensor([-1.5163971185684204, -2.0603461265563965]),
                               rtol=0, atol=1e-4)
    picked = flow[:, [5, 64, 120], [7, 70, 130]].T
    expected = [[-0.7333252429962158, -0.98674076795578], [-1.645946979522705, -2.2380752563476562],
                [-0.7382358312606812, -1.009169101715088]]
    torch.testing.assert_close(picked, torch.tensor(expected), rtol=0, atol=1e-4)


def test_flow_wrapper_matches_module(sintel_pth, raft_model):
    rng = np.random.default_rng(2)
    img1 = rng.integers(0, 256, (2, 128, 136, 3), dtype=np.uint8)
    img2 = np.roll(img1, -2, axis=1)
    flow = raft.RaftFlow(sintel_pth, iters=2, batch_size=1)(img1, img2)
    with torch.inference_mode():
        expected = raft_model(*(torch.from_numpy(x).permute(0, 3, 1, 2).float() for x in (img1, img2)), iters=2)
    assert flow.shape == (2, 128, 136, 2) and flow.dtype == np.float32
    np.testing.assert_allclose(flow, expected.permute(0, 2, 3, 1).numpy(), atol=1e-4)


def test_pooled_volume_pyramid_equals_halved_feature_pyramid():
    """RAFT pools the volume, SEA-RAFT halves fmap2 bilinearly: equal maps, odd sizes included."""
    gen = torch.Generator().manual_seed(3)
    fmap1 = torch.randn(2, 8, 11, 13, generator=gen)
    fmap2 = torch.randn(2, 8, 11, 13, generator=gen)
    pooled = raft.raft_correlation_pyramid(fmap1, fmap2, num_levels=4)
    halved = searaft.correlation_pyramid(fmap1, fmap2, num_levels=4)
    assert [p.shape for p in pooled] == [h.shape for h in halved]
    for p, h in zip(pooled, halved):
        torch.testing.assert_close(p, h, rtol=0, atol=1e-5)
