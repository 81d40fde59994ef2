"""The FlowFeat DPT decoder in plain torch (NCHW), with the reference state-dict key names.

A clean-room torch twin of model.py DecodeDPT + util/dpt_blocks.py, used by the parity tests and to export NNX
weights to a reference-loadable `decoder.*` state dict. Keys: act_postprocessK.post.{0,1}.*, scratch.layerK_rn.weight,
scratch.refinenetK.resConfUnit{1,2}.conv{1,2}.*, scratch.output_conv0.*, scratch.output_conv1.{0,2}.*, norm.norm.*.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class Postprocess(nn.Module):
    """Token sequence (B, P+N, C) or grid (B, C, h, w) → `post` layers on the (B, C, h, w) grid."""

    def __init__(self, patch_size: int, *layers: nn.Module, num_prefix_tokens: int = 1):
        super().__init__()
        self.patch_size = patch_size
        self.num_prefix_tokens = num_prefix_tokens
        self.post = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        if x.ndim == 3:  # tokens: drop class (+ register) tokens, then (B, N, C) -> (B, C, h, w)
            x = x[:, self.num_prefix_tokens :].transpose(1, 2)
            x = x.unflatten(2, (hw[0] // self.patch_size, hw[1] // self.patch_size))
        return self.post(x)


class ResidualConvUnit(nn.Module):
    """relu(x) + conv2(relu(conv1(relu(x)))): the reference's in-place ReLU puts relu(x) on the skip."""

    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)
        return x + self.conv2(F.relu(self.conv1(x)))


class FeatureFusionBlock(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, x: torch.Tensor, lateral: torch.Tensor | None = None) -> torch.Tensor:
        if lateral is not None:
            x = x + self.resConfUnit1(lateral)
        x = self.resConfUnit2(x)
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


class LayerNormBCHW(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) tensor, eps 1e-6."""

    def __init__(self, features: int):
        super().__init__()
        self.norm = nn.LayerNorm(features, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


class TorchDPT(nn.Module):
    """Reference DecodeDPT(cfg, features, features): widths per hooked layer, scratch and output width `features`."""

    def __init__(
        self, vit_dim: int, widths: Sequence[int], features: int = 128, patch_size: int = 16, num_prefix_tokens=1
    ):
        super().__init__()
        w, d = list(widths), features
        p, n = patch_size, num_prefix_tokens
        self.act_postprocess1 = Postprocess(
            p, nn.Conv2d(vit_dim, w[0], 1), nn.ConvTranspose2d(w[0], w[0], 4, stride=4), num_prefix_tokens=n
        )
        self.act_postprocess2 = Postprocess(
            p, nn.Conv2d(vit_dim, w[1], 1), nn.ConvTranspose2d(w[1], w[1], 2, stride=2), num_prefix_tokens=n
        )
        self.act_postprocess3 = Postprocess(p, nn.Conv2d(vit_dim, w[2], 1), num_prefix_tokens=n)
        self.act_postprocess4 = Postprocess(
            p, nn.Conv2d(vit_dim, w[3], 1), nn.Conv2d(w[3], w[3], 3, stride=2, padding=1), num_prefix_tokens=n
        )
        self.scratch = nn.Module()
        for k in range(4):
            setattr(self.scratch, f"layer{k + 1}_rn", nn.Conv2d(w[k], d, 3, padding=1, bias=False))
        for k in range(4):
            setattr(self.scratch, f"refinenet{k + 1}", FeatureFusionBlock(d))
        self.scratch.output_conv0 = nn.Conv2d(d, d, 3, padding=1)
        self.scratch.output_conv1 = nn.Sequential(nn.Conv2d(d, d, 3, padding=1), nn.ReLU(), nn.Conv2d(d, d, 1))
        self.norm = LayerNormBCHW(d)

    def reassemble(self, hooked: Sequence[torch.Tensor], hw: tuple[int, int]) -> list[torch.Tensor]:
        """The four scratch inputs layerK_rn(act_postprocessK(hooked[K])), at 4h, 2h, h and h/2."""
        posts = (self.act_postprocess1, self.act_postprocess2, self.act_postprocess3, self.act_postprocess4)
        rns = (self.scratch.layer1_rn, self.scratch.layer2_rn, self.scratch.layer3_rn, self.scratch.layer4_rn)
        return [rn(post(x, hw)) for x, post, rn in zip(hooked, posts, rns)]

    def forward(self, hooked: Sequence[torch.Tensor], hw: tuple[int, int]) -> torch.Tensor:
        layer_1, layer_2, layer_3, layer_4 = self.reassemble(hooked, hw)
        s = self.scratch
        path = s.refinenet4(layer_4)
        path = s.refinenet3(path, layer_3)
        path = s.refinenet2(path, layer_2)
        path = s.refinenet1(path, layer_1)
        out = F.interpolate(s.output_conv0(path), hw, mode="bilinear", align_corners=False)
        return self.norm(s.output_conv1(out))
