"""RAFT optical flow (Teed & Deng, ECCV 2020), full model, in plain PyTorch, inference only.

FlowFeat's released teacher `RaftFlow` runs `raft-sintel.pth` for 20 iterations (searaft.md §6, §7). Parameter names
follow princeton-vl/RAFT (core/raft.py, extractor.py, update.py) so the DataParallel `.pth` files (`module.` prefix)
load strictly. The correlation lookup, convex upsampling, motion encoder, padding and numpy wrapper are SEA-RAFT's
(flow/searaft.py): both nets use them unchanged. RAFT-small (bottleneck encoders, ConvGRU, bilinear upsampling) is
not implemented.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from flowfeat_jax.flow import searaft

HIDDEN_DIM = 128
CONTEXT_DIM = 128
CORR_LEVELS = 4
CORR_RADIUS = 4
DEFAULT_ITERS = 20  # FlowFeat's RaftFlow; RAFT's own demo also uses 20.


class ResidualBlock(nn.Module):
    """RAFT encoder block; a stride-2 block has a 1x1 shortcut whose norm is also registered as `norm3`."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: type[nn.Module]):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.norm1 = norm(out_channels)
        self.norm2 = norm(out_channels)
        self.downsample = None
        if stride != 1:
            self.norm3 = norm(out_channels)
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride), self.norm3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = F.relu(self.norm1(self.conv1(x)))
        branch = F.relu(self.norm2(self.conv2(branch)))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + branch)


class BasicEncoder(nn.Module):
    """7x7/2 stem, stages of two blocks at widths 64/96/128 and strides 1/2/2, then a 1x1 conv: 1/8 resolution."""

    def __init__(self, out_channels: int, norm: type[nn.Module]):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3)
        self.norm1 = norm(64)
        stages, width = [], 64
        for stage_dim, stride in ((64, 1), (96, 2), (128, 2)):
            blocks = ResidualBlock(width, stage_dim, stride, norm), ResidualBlock(stage_dim, stage_dim, 1, norm)
            stages.append(nn.Sequential(*blocks))
            width = stage_dim
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = nn.Conv2d(width, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm1(self.conv1(x)))
        return self.conv2(self.layer3(self.layer2(self.layer1(x))))


class SepConvGRU(nn.Module):
    """Two GRU steps, a 1x5 (horizontal) then a 5x1 (vertical) convolutional one (core/update.py)."""

    def __init__(self, hidden_dim: int, input_dim: int):
        super().__init__()
        channels = hidden_dim + input_dim
        for suffix, kernel, padding in (("1", (1, 5), (0, 2)), ("2", (5, 1), (2, 0))):
            for gate in ("z", "r", "q"):
                setattr(self, f"conv{gate}{suffix}", nn.Conv2d(channels, hidden_dim, kernel, padding=padding))

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        for suffix in ("1", "2"):
            h = gru_step(h, x, *(getattr(self, f"conv{gate}{suffix}") for gate in ("z", "r", "q")))
        return h


def gru_step(h: torch.Tensor, x: torch.Tensor, conv_z: nn.Module, conv_r: nn.Module, conv_q: nn.Module) -> torch.Tensor:
    """h' = (1 - z) h + z q with z = sigma(conv_z[h, x]), r = sigma(conv_r[h, x]), q = tanh(conv_q[r h, x])."""
    hx = torch.cat([h, x], dim=1)
    z = torch.sigmoid(conv_z(hx))
    r = torch.sigmoid(conv_r(hx))
    q = torch.tanh(conv_q(torch.cat([r * h, x], dim=1)))
    return (1 - z) * h + z * q


class FlowHead(nn.Module):
    def __init__(self, in_channels: int, hidden: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.conv1(x)))


class UpdateBlock(nn.Module):
    """`BasicUpdateBlock`: motion encoder, SepConvGRU, flow increment and the 0.25-scaled upsampling logits."""

    def __init__(self):
        super().__init__()
        corr_channels = CORR_LEVELS * (2 * CORR_RADIUS + 1) ** 2
        self.encoder = searaft.MotionEncoder(corr_channels, CONTEXT_DIM)
        self.gru = SepConvGRU(HIDDEN_DIM, input_dim=CONTEXT_DIM + HIDDEN_DIM)
        self.flow_head = FlowHead(HIDDEN_DIM, 256)
        self.mask = nn.Sequential(nn.Conv2d(HIDDEN_DIM, 256, 3, padding=1), nn.ReLU(), nn.Conv2d(256, 9 * 64, 1))

    def forward(self, net, context, corr, flow) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the new hidden state and the flow increment; `upsample_logits` gives the mask of a state."""
        net = self.gru(net, torch.cat([context, self.encoder(flow, corr)], dim=1))
        return net, self.flow_head(net)

    def upsample_logits(self, net: torch.Tensor) -> torch.Tensor:
        return 0.25 * self.mask(net)


def raft_correlation_pyramid(fmap1: torch.Tensor, fmap2: torch.Tensor, num_levels: int) -> list[torch.Tensor]:
    """All-pairs volume <f1(p), f2(q)> / sqrt(C), (N*h*w, 1, h, w), then 2x2 average pools of it (core/corr.py)."""
    n, c, h, w = fmap1.shape
    volume = fmap1.reshape(n, c, h * w).transpose(1, 2) @ fmap2.reshape(n, c, h * w) / math.sqrt(c)
    pyramid = [volume.reshape(n * h * w, 1, h, w)]
    for _ in range(num_levels - 1):
        pyramid.append(F.avg_pool2d(pyramid[-1], 2, stride=2))
    return pyramid


class Raft(nn.Module):
    """RAFT: forward(image1, image2, iters=20) -> flow image1->image2 in pixels (N, 2, H, W).

    Inputs are float RGB in [0, 255], N x 3 x H x W, H and W >= 121. Official RAFT does not pad; like FlowFeat's
    RaftFlow (InputPadder before, unpad after) the pair is edge-padded to a multiple of 8 here and the flow cropped.
    """

    def __init__(self):
        super().__init__()
        self.fnet = BasicEncoder(256, nn.InstanceNorm2d)  # No affine weights, no running statistics.
        self.cnet = BasicEncoder(HIDDEN_DIM + CONTEXT_DIM, nn.BatchNorm2d)
        self.update_block = UpdateBlock()

    def forward(self, image1: torch.Tensor, image2: torch.Tensor, iters: int = DEFAULT_ITERS) -> torch.Tensor:
        if iters < 1:
            raise ValueError(f"RAFT needs iters >= 1, got {iters}")
        images, crop = searaft.normalize_and_pad(image1, image2, "RAFT")
        fmap1, fmap2 = self.fnet(torch.cat([images[:, :3], images[:, 3:]], dim=0)).chunk(2, dim=0)
        pyramid = raft_correlation_pyramid(fmap1, fmap2, CORR_LEVELS)
        net, context = self.cnet(images[:, :3]).split([HIDDEN_DIM, CONTEXT_DIM], dim=1)
        net, context = torch.tanh(net), torch.relu(context)

        grid = searaft.pixel_grid_like(fmap1[:, :2])
        flow = torch.zeros_like(grid)
        for _ in range(iters):
            corr = searaft.lookup_correlation(pyramid, grid + flow, CORR_RADIUS)
            net, delta = self.update_block(net, context, corr, flow)
            flow = flow + delta
        return searaft.convex_upsample(flow, self.update_block.upsample_logits(net))[crop]


def load_raft_checkpoint(path: str | os.PathLike) -> Raft:
    """RAFT in eval mode with the weights of an official `.pth` (e.g. raft-sintel, raft-things); strict, as in
    FlowFeat's loader: a missing, unexpected or mis-shaped key raises ValueError naming the file and the keys."""
    state = searaft.read_state_dict(path)
    model = Raft()
    searaft.restore_shared_norm(state, ".norm3.", path)
    searaft.load_state_dict_strictly(model, state, path, "RAFT")
    return model.eval()


class RaftFlow(searaft.TorchPairFlow):
    """RAFT flow method: uint8 (N, H, W, 3) pairs -> pixel flow float32 (N, H, W, 2); 20 iterations by default."""

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        device: str = "cpu",
        iters: int | None = None,
        batch_size: int = 8,
        num_threads: int | None = None,
    ):
        iters = DEFAULT_ITERS if iters is None else iters
        super().__init__(load_raft_checkpoint(checkpoint), iters, device, batch_size, num_threads)
