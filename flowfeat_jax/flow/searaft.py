"""SEA-RAFT optical flow (Wang, Lipson & Deng, ECCV 2024) in plain PyTorch, inference only.

The FlowFeat teacher `SeaFlow` runs the spring-M checkpoint for 4 iterations (searaft.md §6). Module and parameter
names follow the official state dict (princeton-vl/SEA-RAFT core/raft.py, extractor.py, layer.py, update.py), so the
released `.pth` files and the Hugging Face `model.safetensors` files load strictly. Layout is NCHW (torch); the
`SeaRaftFlow` wrapper takes and returns NHWC numpy arrays like the other flow methods.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

# The 1/8-resolution grid must be >= 16 on each side: the official code halves the second feature map once more after
# the last pyramid level and crashes below that (searaft.md §2.7); the coarsest level then also has >= 2 pixels, which
# the align_corners=True lookup needs.
MIN_PADDED_SIZE = 128
_DOWNSAMPLE = 8


@dataclasses.dataclass(frozen=True)
class SeaRaftConfig:
    """Architecture of one released SEA-RAFT variant (config/eval/*.json plus the constants in core/raft.py)."""

    variant: str
    blocks_per_stage: tuple[int, int, int]  # BasicBlocks in layer1/2/3: resnet34 (3, 4, 6), resnet18 (2, 2, 2).
    iters: int  # Default number of refinement iterations.
    dim: int = 128  # Hidden state and context width.
    initial_dim: int = 64  # Stem width.
    block_dims: tuple[int, int, int] = (64, 128, 256)
    corr_levels: int = 4
    corr_radius: int = 4
    num_refine_blocks: int = 2  # ConvNeXt blocks in the update block.

    @property
    def corr_channels(self) -> int:
        return self.corr_levels * (2 * self.corr_radius + 1) ** 2

    @classmethod
    def small(cls) -> SeaRaftConfig:
        """SEA-RAFT-S: ResNet-18-shaped encoders, 4 iterations."""
        return cls(variant="S", blocks_per_stage=(2, 2, 2), iters=4)

    @classmethod
    def medium(cls) -> SeaRaftConfig:
        """SEA-RAFT-M: ResNet-34-shaped encoders, 4 iterations (FlowFeat's spring-M teacher)."""
        return cls(variant="M", blocks_per_stage=(3, 4, 6), iters=4)

    @classmethod
    def large(cls) -> SeaRaftConfig:
        """SEA-RAFT-L: the M network and weights run for 12 iterations."""
        return dataclasses.replace(cls.medium(), variant="L", iters=12)

    @classmethod
    def from_variant(cls, variant: str) -> SeaRaftConfig:
        presets = {"S": cls.small, "M": cls.medium, "L": cls.large}
        if variant not in presets:
            raise ValueError(f"unknown SEA-RAFT variant {variant!r}; expected one of {sorted(presets)}")
        return presets[variant]()


class BasicBlock(nn.Module):
    """Residual block of the SEA-RAFT encoders (core/layer.py): ReLU after bn2 *and* after the residual sum."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            # One BatchNorm registered under two names, as upstream: checkpoints hold both `bn3.*` and `downsample.1.*`.
            self.bn3 = nn.BatchNorm2d(out_channels)
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride), self.bn3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = F.relu(self.bn1(self.conv1(x)))
        branch = F.relu(self.bn2(self.conv2(branch)))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + branch)


class ResNetEncoder(nn.Module):
    """`ResNetFPN` of core/extractor.py: 7x7/2 stem and three residual stages to 1/8 resolution, then a 1x1 conv."""

    def __init__(self, cfg: SeaRaftConfig, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, cfg.initial_dim, 7, stride=2, padding=3)
        self.bn1 = nn.BatchNorm2d(cfg.initial_dim)
        stages = []
        width = cfg.initial_dim
        for stage_dim, num_blocks, stride in zip(cfg.block_dims, cfg.blocks_per_stage, (1, 2, 2)):
            blocks = [BasicBlock(width, stage_dim, stride)]
            blocks += [BasicBlock(stage_dim, stage_dim, 1) for _ in range(num_blocks - 1)]
            stages.append(nn.Sequential(*blocks))
            width = stage_dim
        self.layer1, self.layer2, self.layer3 = stages
        self.final_conv = nn.Conv2d(width, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.final_conv(self.layer3(self.layer2(self.layer1(x))))


class MotionEncoder(nn.Module):
    """`BasicMotionEncoder` of core/update.py: correlation and flow features, with the raw flow appended."""

    def __init__(self, corr_channels: int, dim: int):
        super().__init__()
        self.convc1 = nn.Conv2d(corr_channels, 2 * dim, 1)
        self.convc2 = nn.Conv2d(2 * dim, dim + dim // 2, 3, padding=1)
        self.convf1 = nn.Conv2d(2, dim, 7, padding=3)
        self.convf2 = nn.Conv2d(dim, dim // 2, 3, padding=1)
        self.conv = nn.Conv2d(2 * dim, dim - 2, 3, padding=1)

    def forward(self, flow: torch.Tensor, corr: torch.Tensor) -> torch.Tensor:
        corr_features = F.relu(self.convc2(F.relu(self.convc1(corr))))
        flow_features = F.relu(self.convf2(F.relu(self.convf1(flow))))
        motion = F.relu(self.conv(torch.cat([corr_features, flow_features], dim=1)))
        return torch.cat([motion, flow], dim=1)


class ConvNextBlock(nn.Module):
    """ConvNeXt block of core/layer.py with a final 1x1 projection: x -> final(x + gamma * MLP(LN(dwconv(x))))."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * out_dim)
        self.pwconv2 = nn.Linear(4 * out_dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))
        self.final = nn.Conv2d(dim, out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.gamma * self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))
        return self.final(x + y.permute(0, 3, 1, 2))


class UpdateBlock(nn.Module):
    """`BasicUpdateBlock` of core/update.py: motion encoder, then ConvNeXt blocks refine the hidden state (no GRU)."""

    def __init__(self, cfg: SeaRaftConfig):
        super().__init__()
        self.encoder = MotionEncoder(cfg.corr_channels, cfg.dim)
        self.refine = nn.ModuleList([ConvNextBlock(3 * cfg.dim, cfg.dim) for _ in range(cfg.num_refine_blocks)])

    def forward(self, net: torch.Tensor, context: torch.Tensor, corr: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        context = torch.cat([context, self.encoder(flow, corr)], dim=1)
        for block in self.refine:
            net = block(torch.cat([net, context], dim=1))
        return net


def sintel_padding(height: int, width: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding to the next multiple of 8, split as InputPadder(mode='sintel') does."""
    pad_h = -height % _DOWNSAMPLE
    pad_w = -width % _DOWNSAMPLE
    return pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2


def correlation_pyramid(fmap1: torch.Tensor, fmap2: torch.Tensor, num_levels: int) -> list[torch.Tensor]:
    """All-pairs correlation volumes <f1(p), f2(q)> / sqrt(C), one per level (core/corr.py CorrBlock).

    Level l correlates fmap1 with fmap2 bilinearly halved l times (align_corners=False). Each volume has shape
    (N*h*w, 1, h_l, w_l): one target map per source pixel, ready for `grid_sample`.
    """
    n, c, h, w = fmap1.shape
    source = fmap1.reshape(n, c, h * w).transpose(1, 2)
    pyramid = []
    for level in range(num_levels):
        if level > 0:
            fmap2 = F.interpolate(fmap2, scale_factor=0.5, mode="bilinear", align_corners=False)
        h2, w2 = fmap2.shape[-2:]
        volume = source @ fmap2.reshape(n, c, h2 * w2) / math.sqrt(c)
        pyramid.append(volume.reshape(n * h * w, 1, h2, w2))
    return pyramid


def lookup_correlation(pyramid: list[torch.Tensor], coords: torch.Tensor, radius: int) -> torch.Tensor:
    """Bilinear samples of each level on a (2r+1)^2 window around coords / 2^l (core/corr.py CorrBlock.__call__).

    coords: (N, 2, h, w) target positions in 1/8-res pixels, channel 0 = x. Returns (N, levels*(2r+1)^2, h, w), level
    major; within a level channel (2r+1)*i + j holds x-offset i-r and y-offset j-r (RAFT's order). Outside the map the
    samples are 0 (grid_sample, zeros padding, align_corners=True).
    """
    n, _, h, w = coords.shape
    offsets = torch.arange(-radius, radius + 1, dtype=coords.dtype, device=coords.device)
    # window[i, j] = (x offset i, y offset j); x runs over the rows of the sampled grid.
    window = torch.stack(torch.meshgrid(offsets, offsets, indexing="ij"), dim=-1)
    centres = coords.permute(0, 2, 3, 1).reshape(n * h * w, 1, 1, 2)
    samples = []
    for level, volume in enumerate(pyramid):
        h2, w2 = volume.shape[-2:]
        points = centres / 2**level + window
        scale = torch.tensor([2.0 / (w2 - 1), 2.0 / (h2 - 1)], dtype=coords.dtype, device=coords.device)
        sampled = F.grid_sample(volume, points * scale - 1, mode="bilinear", padding_mode="zeros", align_corners=True)
        samples.append(sampled.reshape(n, h, w, -1))
    return torch.cat(samples, dim=-1).permute(0, 3, 1, 2)


def convex_upsample(flow: torch.Tensor, mask: torch.Tensor, factor: int = _DOWNSAMPLE) -> torch.Tensor:
    """Upsample a coarse flow by `factor` with learned convex weights (RAFT paper §3.3; core/raft.py upsample_data).

    flow: (N, 2, h, w) in coarse pixels; mask: (N, 9*factor^2, h, w) logits, read as (9, factor, factor) per coarse
    pixel (3x3 neighbour in unfold order, sub-row, sub-col) and softmaxed over the 9 neighbours. Fine pixel
    (factor*y + p, factor*x + q) = sum_k weight_k * factor * flow(neighbour k of (y, x)), neighbours outside are 0.
    Returns (N, 2, factor*h, factor*w) in fine pixels.
    """
    n, c, h, w = flow.shape
    weights = torch.softmax(mask.reshape(n, 1, 9, factor, factor, h, w), dim=2)
    neighbours = F.unfold(factor * flow, kernel_size=3, padding=1).reshape(n, c, 9, 1, 1, h, w)
    fine = (weights * neighbours).sum(dim=2)  # (N, C, p, q, h, w)
    return fine.permute(0, 1, 4, 2, 5, 3).reshape(n, c, factor * h, factor * w)


def pixel_grid_like(flow: torch.Tensor) -> torch.Tensor:
    """Pixel coordinates shaped like a (N, 2, h, w) flow: channel 0 = x, channel 1 = y."""
    n, _, h, w = flow.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=flow.device), torch.arange(w, device=flow.device), indexing="ij")
    return torch.stack([xs, ys]).to(flow.dtype)[None].expand(n, -1, -1, -1)


class SeaRaft(nn.Module):
    """SEA-RAFT network. forward(image1, image2) -> final flow image1->image2 in pixels (N, 2, H, W).

    Inputs are float RGB in [0, 255], N x 3 x H x W, H and W >= 121 (padded to >= 128, the official floor). Images are
    padded to a multiple of 8 by edge replication (InputPadder 'sintel') and the flow is cropped back. Only the final
    prediction is computed (test mode); the uncertainty outputs (flow_head channels 2-5) are unused.
    """

    def __init__(self, cfg: SeaRaftConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.cnet = ResNetEncoder(cfg, in_channels=6, out_channels=2 * dim)
        self.fnet = ResNetEncoder(cfg, in_channels=3, out_channels=2 * dim)
        self.init_conv = nn.Conv2d(2 * dim, 2 * dim, 3, padding=1)
        # Heads keep nn.Sequential indices so that parameter names match the checkpoints (`flow_head.2.weight`).
        self.upsample_weight = nn.Sequential(
            nn.Conv2d(dim, 2 * dim, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * dim, 9 * _DOWNSAMPLE**2, 1)
        )
        self.flow_head = nn.Sequential(
            nn.Conv2d(dim, 2 * dim, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * dim, 6, 3, padding=1)
        )
        self.update_block = UpdateBlock(cfg)

    def forward(self, image1: torch.Tensor, image2: torch.Tensor, iters: int | None = None) -> torch.Tensor:
        iters = self.cfg.iters if iters is None else iters
        images, crop = normalize_and_pad(image1, image2, "SEA-RAFT")
        net, context = self.init_conv(self.cnet(images)).split(self.cfg.dim, dim=1)
        flow = self.flow_head(net)[:, :2]  # Iteration 0 regresses the flow directly, without correlation.
        fmap1, fmap2 = self.fnet(torch.cat([images[:, :3], images[:, 3:]], dim=0)).chunk(2, dim=0)
        pyramid = correlation_pyramid(fmap1, fmap2, self.cfg.corr_levels)
        grid = pixel_grid_like(flow)
        for _ in range(iters):
            corr = lookup_correlation(pyramid, grid + flow, self.cfg.corr_radius)
            net = self.update_block(net, context, corr, flow)
            flow = flow + self.flow_head(net)[:, :2]

        flow = convex_upsample(flow, 0.25 * self.upsample_weight(net))
        return flow[crop]


def normalize_and_pad(image1: torch.Tensor, image2: torch.Tensor, net_name: str) -> tuple[torch.Tensor, tuple]:
    """Stack a checked 0..255 image pair as N x 6 x H' x W' in [-1, 1], edge-padded to a multiple of 8 like
    InputPadder('sintel'); also return the index that crops a padded N x C x H' x W' map back to H x W."""
    check_image_pair(image1, image2, net_name)
    height, width = image1.shape[-2:]
    left, right, top, bottom = sintel_padding(height, width)
    images = torch.cat([image1, image2], dim=1) * (2 / 255.0) - 1
    images = F.pad(images, (left, right, top, bottom), mode="replicate")
    return images, (Ellipsis, slice(top, top + height), slice(left, left + width))


def check_image_pair(image1: torch.Tensor, image2: torch.Tensor, net_name: str) -> None:
    """Raise ValueError unless both images are N x 3 x H x W of one shape with H, W above the size floor."""
    if image1.shape != image2.shape or image1.ndim != 4 or image1.shape[1] != 3:
        raise ValueError(f"{net_name} wants two N x 3 x H x W images of one shape, got {tuple(image1.shape)} and "
                         f"{tuple(image2.shape)}")
    height, width = image1.shape[-2:]
    min_size = MIN_PADDED_SIZE - _DOWNSAMPLE + 1
    if min(height, width) < min_size:
        raise ValueError(f"{net_name} needs H and W >= {min_size} (padded to >= {MIN_PADDED_SIZE}, the official "
                         f"floor), got {height}x{width}; upsample the frames first")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` file or of a torch-saved state dict, any DataParallel `module.` prefix removed."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    # Any unreadable file (text, truncated, pickled objects) gets the same one-line error.
    try:
        if path.endswith(".safetensors"):
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{path} is not a readable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors (got {type(state).__name__})")
    if state and all(key.startswith("module.") for key in state):
        state = {key.removeprefix("module."): value for key, value in state.items()}
    return dict(state)


def infer_variant(state: Mapping[str, torch.Tensor]) -> str | None:
    """'M' or 'S' from the depth of cnet's last stage (6 blocks vs 2); None for anything else."""
    if "cnet.layer3.5.conv1.weight" in state:
        return "M"
    if "cnet.layer3.1.conv1.weight" in state:
        return "S"
    return None


def load_searaft_checkpoint(path: str | os.PathLike, variant: str | None = None) -> SeaRaft:
    """Build SEA-RAFT in eval mode with the weights of an official `.pth` or Hugging Face `model.safetensors` file.

    variant: 'S', 'M' or 'L' (= M weights, 12 iterations); None infers S or M from the keys. Loading is strict: a
    missing, unexpected or mis-shaped key raises ValueError naming the file and the first offending keys. The
    safetensors files keep only `bn3.*` of the BatchNorm shared with `downsample.1.*`; the copy is restored here.
    """
    state = read_state_dict(path)
    if variant is None:
        variant = infer_variant(state)
        if variant is None:
            raise ValueError(f"{path} is not a SEA-RAFT checkpoint: no cnet.layer3 blocks among its keys "
                             f"{sorted(state)[:5]}")
    model = SeaRaft(SeaRaftConfig.from_variant(variant))
    restore_shared_norm(state, ".bn3.", path)
    load_state_dict_strictly(model, state, path, f"SEA-RAFT-{variant}")
    return model.eval()


def restore_shared_norm(state: dict[str, torch.Tensor], norm_infix: str, path: str | os.PathLike) -> None:
    """Add the `downsample.1.*` twin of each shared shortcut norm (`norm_infix`, e.g. '.bn3.') where a file lacks it.

    safetensors keeps one name per shared tensor, so Hugging Face files hold only the `bn3.*` copy (searaft.md §4).
    """
    for key in list(state):
        twin = key.replace(norm_infix, ".downsample.1.")
        if twin == key:
            continue
        if twin not in state:
            state[twin] = state[key]
        elif not torch.equal(state[twin], state[key]):
            raise ValueError(f"{path}: {key} and {twin} must be the same shared norm but differ")


def load_state_dict_strictly(
    model: nn.Module, state: Mapping[str, torch.Tensor], path: str | os.PathLike, net_name: str
) -> None:
    """load_state_dict(strict=True), first raising one ValueError that names the file and the offending keys."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    misshaped = [
        f"{key} {tuple(state[key].shape)} != {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state and state[key].shape != value.shape
    ]
    problems = [
        f"{len(keys)} {label} keys, e.g. {keys[:3]}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped))
        if keys
    ]
    if problems:
        raise ValueError(f"{path} is not a {net_name} checkpoint: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


class TorchPairFlow:
    """Runs a torch flow net on uint8 (N, H, W, 3) numpy pairs -> flow img1->img2 in pixels, float32 (N, H, W, 2).

    Pairs go through in chunks of `batch_size` under torch.inference_mode; `num_threads` sets torch's intra-op
    threads when given (leave None to keep the process setting, e.g. 1 thread per data worker).
    """

    def __init__(self, model: nn.Module, iters: int, device: str, batch_size: int, num_threads: int | None):
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.iters = iters
        self.batch_size = batch_size

    def __call__(self, img1: np.ndarray, img2: np.ndarray) -> np.ndarray:
        if img1.dtype != np.uint8 or img2.dtype != np.uint8 or img1.shape != img2.shape or img1.ndim != 4:
            raise ValueError(f"{type(self).__name__} wants two uint8 (N, H, W, 3) arrays of one shape, got "
                             f"{img1.dtype} {img1.shape} and {img2.dtype} {img2.shape}")
        flows = [np.zeros((0, *img1.shape[1:3], 2), np.float32)]
        with torch.inference_mode():
            for start in range(0, len(img1), self.batch_size):
                chunk = slice(start, start + self.batch_size)
                first, second = (
                    torch.from_numpy(np.ascontiguousarray(x[chunk])).to(self.device).permute(0, 3, 1, 2).float()
                    for x in (img1, img2)
                )
                flows.append(self.model(first, second, self.iters).permute(0, 2, 3, 1).cpu().numpy())
        return np.concatenate(flows).astype(np.float32, copy=False)


class SeaRaftFlow(TorchPairFlow):
    """SEA-RAFT flow method; iters None = the variant's default (4 for S/M as FlowFeat's spring-M teacher, 12 for L)."""

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        device: str = "cpu",
        iters: int | None = None,
        variant: str | None = None,
        batch_size: int = 8,
        num_threads: int | None = None,
    ):
        model = load_searaft_checkpoint(checkpoint, variant)
        super().__init__(model, model.cfg.iters if iters is None else iters, device, batch_size, num_threads)
