"""Tests for flowfeat_jax/flow/searaft.py: checkpoint key set and strict loading, forward shapes, and the correlation
lookup and convex upsampling against direct per-pixel implementations."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from flowfeat_jax.flow import searaft


def _batchnorm_shapes(name, channels):
    return {f"{name}.{p}": (channels,) for p in ("weight", "bias", "running_mean", "running_var")} | {
        f"{name}.num_batches_tracked": ()
    }


def _conv_shapes(name, out_channels, in_channels, kernel):
    return {f"{name}.weight": (out_channels, in_channels, kernel, kernel), f"{name}.bias": (out_channels,)}


def _encoder_shapes(prefix, in_channels, blocks_per_stage):
    """ResNetFPN keys as written in searaft.md §4 (official core/extractor.py, core/layer.py)."""
    shapes = _conv_shapes(f"{prefix}.conv1", 64, in_channels, 7) | _batchnorm_shapes(f"{prefix}.bn1", 64)
    width = 64
    for stage, (out, num_blocks, stride) in enumerate(zip((64, 128, 256), blocks_per_stage, (1, 2, 2)), start=1):
        for index in range(num_blocks):
            block = f"{prefix}.layer{stage}.{index}"
            cin = width if index == 0 else out
            shapes |= _conv_shapes(f"{block}.conv1", out, cin, 3) | _conv_shapes(f"{block}.conv2", out, out, 3)
            shapes |= _batchnorm_shapes(f"{block}.bn1", out) | _batchnorm_shapes(f"{block}.bn2", out)
            if index == 0 and (stride != 1 or cin != out):
                shapes |= _batchnorm_shapes(f"{block}.bn3", out) | _batchnorm_shapes(f"{block}.downsample.1", out)
                shapes |= _conv_shapes(f"{block}.downsample.0", out, cin, 1)
        width = out
    return shapes | _conv_shapes(f"{prefix}.final_conv", 256, 256, 1)


def official_shapes(variant):
    blocks = {"S": (2, 2, 2), "M": (3, 4, 6)}[variant]
    shapes = _encoder_shapes("cnet", 6, blocks) | _encoder_shapes("fnet", 3, blocks)
    shapes |= _conv_shapes("init_conv", 256, 256, 3)
    shapes |= _conv_shapes("flow_head.0", 256, 128, 3) | _conv_shapes("flow_head.2", 6, 256, 3)
    shapes |= _conv_shapes("upsample_weight.0", 256, 128, 3) | _conv_shapes("upsample_weight.2", 576, 256, 1)
    enc = "update_block.encoder"
    shapes |= _conv_shapes(f"{enc}.convc1", 256, 324, 1) | _conv_shapes(f"{enc}.convc2", 192, 256, 3)
    shapes |= _conv_shapes(f"{enc}.convf1", 128, 2, 7) | _conv_shapes(f"{enc}.convf2", 64, 128, 3)
    shapes |= _conv_shapes(f"{enc}.conv", 126, 256, 3)
    for index in range(2):
        block = f"update_block.refine.{index}"
        shapes |= {f"{block}.dwconv.weight": (384, 1, 7, 7), f"{block}.dwconv.bias": (384,), f"{block}.gamma": (384,)}
        shapes |= {f"{block}.norm.weight": (384,), f"{block}.norm.bias": (384,)}
        shapes |= {f"{block}.pwconv1.weight": (512, 384), f"{block}.pwconv1.bias": (512,)}
        shapes |= {f"{block}.pwconv2.weight": (384, 512), f"{block}.pwconv2.bias": (384,)}
        shapes |= _conv_shapes(f"{block}.final", 128, 384, 1)
    return shapes


def random_state(variant, seed=0):
    """A checkpoint-like state dict with the official names; small weights keep the random network's flow tame."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in official_shapes(variant).items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(7, dtype=torch.int64)
        elif name.endswith("running_var"):
            state[name] = 0.5 + torch.rand(shape, generator=gen)
        else:
            state[name] = 0.03 * torch.randn(shape, generator=gen)
    for name in state:  # The shared BatchNorm: both names hold the same values in an official .pth.
        if ".downsample.1." in name:
            state[name] = state[name.replace(".downsample.1.", ".bn3.")]
    return state


def formula_state(shapes, twin_of_downsample):
    """Deterministic sine weights (machine- and version-independent) under the official names; `twin_of_downsample`
    names the norm ('.bn3.' / '.norm3.') that `downsample.1` shares."""
    state = {}
    for index, (name, shape) in enumerate(sorted(shapes.items())):
        wave = torch.sin(0.37 * torch.arange(math.prod(shape), dtype=torch.float64) + index).reshape(shape)
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(0)
        elif name.endswith("running_var"):
            state[name] = (1 + 0.5 * wave**2).float()
        elif name.endswith(("running_mean", "bias")):
            state[name] = (0.05 * wave).float()
        elif len(shape) >= 2:
            gain = 0.2 if name.startswith(("flow_head.2", "update_block.flow_head.conv2")) else 1.0
            state[name] = (gain * wave / math.sqrt(math.prod(shape[1:]))).float()
        else:  # Norm scales and layer-scale gammas.
            state[name] = (1 + 0.1 * wave).float()
    for name in state:
        if ".downsample.1." in name:
            state[name] = state[name.replace(".downsample.1.", twin_of_downsample)]
    return state


def formula_images(height, width, shift=2.5):
    """A smooth RGB pattern (1, 3, H, W) in 0..255 and the same pattern moved `shift` pixels right."""
    y, x = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                          indexing="ij")
    c = torch.arange(3, dtype=torch.float64).view(3, 1, 1)

    def pattern(dx):
        wave = torch.sin(0.21 * (x - dx) + 0.13 * y * (1 + c) + c) * torch.cos(0.05 * y - 0.07 * (x - dx))
        return 127.5 + 127.5 * wave

    return pattern(0.0).float()[None], pattern(shift).float()[None]


@pytest.fixture(scope="module")
def medium_pth(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "Tartan-C-T-TSKH-spring540x960-M.pth"
    torch.save(random_state("M"), path)
    return path


@pytest.fixture(scope="module")
def medium_model(medium_pth):
    return searaft.load_searaft_checkpoint(medium_pth)


@pytest.mark.parametrize("variant, num_keys", [("M", 472), ("S", 276)])
def test_module_has_the_official_key_set(variant, num_keys):
    expected = official_shapes(variant)
    model = searaft.SeaRaft(searaft.SeaRaftConfig.from_variant(variant))
    assert len(expected) == num_keys
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected


def test_pth_loads_strictly_and_infers_medium(medium_pth, medium_model):
    state = torch.load(medium_pth)
    assert medium_model.cfg == searaft.SeaRaftConfig.medium()
    assert not medium_model.training
    for name, value in medium_model.state_dict().items():
        torch.testing.assert_close(value, state[name], rtol=0, atol=0)
    block = medium_model.cnet.layer2[0]
    assert block.downsample[1] is block.bn3


def test_module_prefix_and_large_variant(tmp_path):
    path = tmp_path / "raft-style.pth"
    state = random_state("M", seed=1)
    torch.save({"module." + k: v for k, v in state.items()}, path)
    model = searaft.load_searaft_checkpoint(path, variant="L")
    assert model.cfg.iters == 12 and model.cfg.blocks_per_stage == (3, 4, 6)
    torch.testing.assert_close(model.update_block.refine[1].final.weight, state["update_block.refine.1.final.weight"])


def test_safetensors_without_downsample_copies_loads_small(tmp_path):
    state = random_state("S", seed=2)
    path = tmp_path / "model.safetensors"
    save_file({k: v.clone() for k, v in state.items() if ".downsample.1." not in k}, str(path))
    model = searaft.load_searaft_checkpoint(path)
    assert model.cfg.variant == "S"
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, state[name], rtol=0, atol=0)


def _corrupt(state, kind):
    state = dict(state)
    if kind == "missing":
        del state["update_block.encoder.convf1.weight"]
    elif kind == "extra":
        state["update_block.gru.convz1.weight"] = torch.zeros(1)
    elif kind == "shape":
        state["flow_head.2.weight"] = torch.zeros(2, 256, 3, 3)
    return state


@pytest.mark.parametrize(
    "kind, message",
    [("missing", "convf1.weight"), ("extra", "gru.convz1.weight"), ("shape", "flow_head.2.weight")],
)
def test_wrong_checkpoint_is_rejected_naming_file_and_key(tmp_path, kind, message):
    path = tmp_path / f"bad_{kind}.pth"
    torch.save(_corrupt(random_state("S"), kind), path)
    with pytest.raises(ValueError, match=rf"bad_{kind}\.pth.*{message}"):
        searaft.load_searaft_checkpoint(path)


def test_non_checkpoints_are_rejected(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match="notes.pth"):
        searaft.load_searaft_checkpoint(text)
    listing = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listing)
    with pytest.raises(ValueError, match="list.pth"):
        searaft.load_searaft_checkpoint(listing)
    other = tmp_path / "other_net.safetensors"
    save_file({"backbone.weight": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="other_net.safetensors"):
        searaft.load_searaft_checkpoint(other)
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        searaft.load_searaft_checkpoint(tmp_path / "absent.pth")
    with pytest.raises(ValueError, match="variant"):
        searaft.SeaRaftConfig.from_variant("XL")


def test_forward_random_weights_gives_finite_full_resolution_flow(medium_model):
    gen = torch.Generator().manual_seed(3)
    image1 = 255 * torch.rand(2, 3, 128, 128, generator=gen)
    image2 = torch.roll(image1, shifts=(2, -3), dims=(2, 3))
    with torch.inference_mode():
        flow = medium_model(image1, image2)
        odd = medium_model(image1[:1, :, :123, :], image2[:1, :, :123, :], iters=1)
    assert flow.shape == (2, 2, 128, 128) and flow.dtype == torch.float32
    assert torch.isfinite(flow).all() and flow.abs().max() > 0
    assert odd.shape == (1, 2, 123, 128) and torch.isfinite(odd).all()


def test_matches_official_code_on_formula_weights():
    """Constants: the official princeton-vl/SEA-RAFT @f41d0a7 modules (S, test_mode, iters 4) run once on CPU with
    these weights and images; max abs difference of this module there was < 1e-5."""
    model = searaft.SeaRaft(searaft.SeaRaftConfig.small()).eval()
    model.load_state_dict(formula_state(official_shapes("S"), ".bn3."))
    with torch.inference_mode():
        flow = model(*formula_images(128, 136), iters=4)[0]
    torch.testing.assert_close(flow.mean(dim=(1, 2)), torch.tensor([-0.6719539761543274, -0.0012843817239627242]),
                               rtol=0, atol=1e-4)
    picked = flow[:, [5, 64, 120], [7, 70, 130]].T
    expected = [[-0.35356977581977844, 0.009764006361365318], [-0.7272470593452454, 0.0008698984165675938],
                [-0.31616345047950745, -0.029464349150657654]]
    torch.testing.assert_close(picked, torch.tensor(expected), rtol=0, atol=1e-4)


def test_size_floor_and_shape_errors(medium_model):
    small = torch.zeros(1, 3, 120, 200)
    with pytest.raises(ValueError, match="120x200"):
        medium_model(small, small)
    with pytest.raises(ValueError, match="N x 3 x H x W"):
        medium_model(torch.zeros(1, 3, 128, 128), torch.zeros(1, 3, 128, 136))


def test_sintel_padding_splits_like_input_padder():
    assert searaft.sintel_padding(121, 128) == (0, 0, 3, 4)
    assert searaft.sintel_padding(436, 1023) == (0, 1, 2, 2)


def test_flow_wrapper_nhwc_batching_matches_module(medium_pth, medium_model):
    rng = np.random.default_rng(4)
    img1 = rng.integers(0, 256, (3, 128, 136, 3), dtype=np.uint8)
    img2 = np.roll(img1, 3, axis=2)
    method = searaft.SeaRaftFlow(medium_pth, batch_size=2, iters=1)
    flow = method(img1, img2)
    assert flow.shape == (3, 128, 136, 2) and flow.dtype == np.float32
    with torch.inference_mode():
        expected = medium_model(*(torch.from_numpy(x).permute(0, 3, 1, 2).float() for x in (img1, img2)), iters=1)
    np.testing.assert_allclose(flow, expected.permute(0, 2, 3, 1).numpy(), atol=1e-4)
    with pytest.raises(ValueError, match="uint8"):
        method(img1.astype(np.float32), img2)


def _lookup_reference(fmap1, fmap2, coords, levels, radius):
    """Per-pixel loops: dot products with the halved fmap2, bilinear taps with zeros outside the map."""
    n, c, h, w = fmap1.shape
    side = 2 * radius + 1
    out = np.zeros((n, levels * side * side, h, w))
    f1 = fmap1.double().numpy()
    for level in range(levels):
        f2 = fmap2.double().numpy()
        h2, w2 = f2.shape[-2:]
        for b in range(n):
            for y in range(h):
                for x in range(w):
                    corr = np.einsum("c,cij->ij", f1[b, :, y, x], f2[b]) / np.sqrt(c)
                    cx, cy = coords[b, 0, y, x].item() / 2**level, coords[b, 1, y, x].item() / 2**level
                    for i in range(side):  # x offset
                        for j in range(side):  # y offset
                            px, py = cx + i - radius, cy + j - radius
                            x0, y0 = int(np.floor(px)), int(np.floor(py))
                            value = 0.0
                            for xi, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
                                for yi, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
                                    if 0 <= xi < w2 and 0 <= yi < h2:
                                        value += wx * wy * corr[yi, xi]
                            out[b, level * side * side + i * side + j, y, x] = value
        fmap2 = F.interpolate(fmap2, scale_factor=0.5, mode="bilinear", align_corners=False)
    return out


def test_correlation_lookup_matches_direct_sampling():
    gen = torch.Generator().manual_seed(5)
    fmap1 = torch.randn(2, 4, 4, 5, generator=gen)
    fmap2 = torch.randn(2, 4, 8, 10, generator=gen)  # Target map larger than the source: exercises h2 != h.
    coords = torch.rand(2, 2, 4, 5, generator=gen) * torch.tensor([12.0, 10.0]).view(1, 2, 1, 1) - 1.5
    pyramid = searaft.correlation_pyramid(fmap1, fmap2, num_levels=3)
    got = searaft.lookup_correlation(pyramid, coords, radius=2)
    np.testing.assert_allclose(got.numpy(), _lookup_reference(fmap1, fmap2, coords, 3, 2), atol=1e-5)


def test_convex_upsample_matches_per_pixel_softmax_average():
    gen = torch.Generator().manual_seed(6)
    factor, h, w = 4, 3, 5
    flow = torch.randn(2, 2, h, w, generator=gen)
    mask = torch.randn(2, 9 * factor * factor, h, w, generator=gen)
    got = searaft.convex_upsample(flow, mask, factor=factor).numpy()
    padded = np.pad(factor * flow.double().numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)))
    logits = mask.double().numpy().reshape(2, 9, factor, factor, h, w)
    expected = np.zeros((2, 2, factor * h, factor * w))
    for fy in range(factor * h):
        for fx in range(factor * w):
            y, p, x, q = fy // factor, fy % factor, fx // factor, fx % factor
            weights = np.exp(logits[:, :, p, q, y, x])
            weights /= weights.sum(axis=1, keepdims=True)
            for k in range(9):  # Neighbour k of the unfold order sits at (y + k // 3 - 1, x + k % 3 - 1).
                expected[:, :, fy, fx] += weights[:, k, None] * padded[:, :, y + k // 3, x + k % 3]
    np.testing.assert_allclose(got, expected, atol=1e-5)
