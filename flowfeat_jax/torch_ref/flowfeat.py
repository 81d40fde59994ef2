"""FlowFeat in plain torch with the reference state-dict layout: `encoder.*` (torch-hub ViT names) + `decoder.*`
(reference DecodeDPT names), so weights exported by tools/export_torch.py run without JAX or the reference repository.

    model = load_torch_flowfeat("flowfeat.pth").eval()
    with torch.inference_mode():
        encoder_features, flowfeat = model(images)  # images (B, 3, H, W) ImageNet-normalised, H, W multiples of 2p

Files written by tools/export_torch.py carry their architecture (`architecture_dict`: inside a .safetensors file's
metadata, beside a .pth as `<file>.json`), so nothing is guessed. A file without it (a released reference checkpoint)
is read from its tensor shapes (`infer_config`); only the head count is not stored there, and is taken from the
released models' widths (`torch_ref.vit.head_count`) unless given.
"""

import collections
import dataclasses
import json
import pathlib
from collections.abc import Mapping, Sequence

import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

from flowfeat_jax.torch_ref.dpt import TorchDPT
from flowfeat_jax.torch_ref.vit import HubViT, HubViTConfig, head_count, square_side


def default_hooks(num_layers: int) -> tuple[int, ...]:
    """Last block of every quarter of the encoder, as the reference CfgDPT: (2, 5, 8, 11) for 12, (5, 11, 17, 23)
    for 24 blocks."""
    if num_layers < 4:
        raise ValueError(f"an encoder needs at least 4 blocks for 4 DPT hooks, got {num_layers}")
    return tuple(quarter * num_layers // 4 - 1 for quarter in (1, 2, 3, 4))


@dataclasses.dataclass(frozen=True)
class TorchFlowFeatConfig:
    encoder: HubViTConfig
    widths: tuple[int, int, int, int]  # channels of the four reassembled layers (reference CfgDPT.features)
    features: int  # decoder width d
    hooks: tuple[int, ...]


class TorchFlowFeat(nn.Module):
    """Reference FlowFeat.forward_up: (encoder final-norm features (B, C, h, w), FlowFeat features (B, d, H, W))."""

    def __init__(self, cfg: TorchFlowFeatConfig):
        super().__init__()
        self.cfg = cfg
        enc = cfg.encoder
        self.encoder = HubViT(enc)
        self.decoder = TorchDPT(enc.hidden_size, cfg.widths, cfg.features, enc.patch_size, enc.num_prefix_tokens)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.cfg.encoder
        step = 2 * enc.patch_size  # the decoder's /2 path needs an even token grid
        if x.ndim != 4 or x.shape[2] % step or x.shape[3] % step:
            raise ValueError(f"expected images (B, 3, H, W) with H, W multiples of {step}, got {tuple(x.shape)}")
        h, w = x.shape[2] // enc.patch_size, x.shape[3] // enc.patch_size
        hooked = self.encoder(x, self.cfg.hooks)
        final = self.encoder.norm(hooked[-1][:, enc.num_prefix_tokens:])
        final = final.transpose(1, 2).reshape(x.shape[0], enc.hidden_size, h, w)
        return final, self.decoder(hooked, (x.shape[2], x.shape[3]))


def _shape(shapes: Mapping[str, Sequence[int]], key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ValueError(f"cannot infer the FlowFeat architecture: missing key {key}")
    return tuple(shapes[key])


def _size(shapes: Mapping[str, Sequence[int]], what: str, sources: Sequence[tuple[str, int]]) -> int:
    """One size read from several (key, axis) places, the most common value winning: a single mis-shaped tensor
    then shows up as that tensor's mismatch instead of changing the inferred architecture."""
    values = [tuple(shapes[k])[axis] for k, axis in sources if k in shapes and len(shapes[k]) > axis]
    if not values:
        raise ValueError(f"cannot infer the {what}: missing key {sources[0][0]}")
    return collections.Counter(values).most_common(1)[0][0]


def infer_config(shapes: Mapping[str, Sequence[int]], num_heads: int | None = None) -> TorchFlowFeatConfig:
    """The architecture of a reference-layout state dict from its tensor shapes ({key: shape}).

    Patch size and width from the patch embedding (width confirmed by the tokens and norms), depth from the block
    indices, the MLP width (and SwiGLU) from the blocks, registers, layer scale, mask token (DINOv2) and qkv bias from
    key presence, the position grid from pos_embed, decoder widths and d from the decoder. Hooks are the reference
    defaults for the depth.
    """
    _shape(shapes, "encoder.patch_embed.proj.weight")
    e, d = "encoder.", "decoder."
    width = _size(shapes, "encoder width", [(e + "patch_embed.proj.weight", 0), (e + "patch_embed.proj.bias", 0),
                                            (e + "cls_token", 2), (e + "pos_embed", 2), (e + "norm.weight", 0),
                                            (e + "norm.bias", 0)])
    patch = _size(shapes, "patch size", [(e + "patch_embed.proj.weight", 2), (e + "patch_embed.proj.weight", 3)])
    blocks = {int(k.split(".")[2]) for k in shapes if k.startswith("encoder.blocks.")}
    num_layers = max(blocks, default=-1) + 1
    if sorted(blocks) != list(range(num_layers)) or num_layers == 0:
        raise ValueError(f"encoder blocks must be numbered 0..n-1, found {sorted(blocks)}")
    swiglu = "encoder.blocks.0.mlp.w12.weight" in shapes
    layers = range(num_layers)
    if swiglu:
        mlp_dim = _size(shapes, "MLP width", [(f"{e}blocks.{i}.mlp.w3.weight", 1) for i in layers])
    else:
        mlp_dim = _size(shapes, "MLP width", [(f"{e}blocks.{i}.mlp.fc1.weight", 0) for i in layers])
    registers = _shape(shapes, "encoder.register_tokens")[1] if "encoder.register_tokens" in shapes else 0
    num_positions = _shape(shapes, "encoder.pos_embed")[1] - 1
    try:
        pos_grid = square_side(num_positions)
    except ValueError as error:
        raise ValueError(f"encoder.pos_embed: {error}") from None
    encoder = HubViTConfig(
        patch_size=patch,
        hidden_size=width,
        num_layers=num_layers,
        num_heads=num_heads or head_count(width),
        mlp_dim=mlp_dim,
        num_registers=registers,
        layer_scale="encoder.blocks.0.ls1.gamma" in shapes,
        swiglu=swiglu,
        qkv_bias="encoder.blocks.0.attn.qkv.bias" in shapes,
        mask_token="encoder.mask_token" in shapes,
        pos_grid=pos_grid,
        pos_antialias=registers > 0,  # hub register models: antialiased resize to size, no offset
    )
    widths = tuple(
        _size(shapes, f"decoder width {k}", [(f"{d}act_postprocess{k}.post.0.weight", 0),
                                             (f"{d}act_postprocess{k}.post.0.bias", 0),
                                             (f"{d}scratch.layer{k}_rn.weight", 1)])
        for k in (1, 2, 3, 4)
    )
    features = _size(shapes, "decoder features", [(d + "norm.norm.weight", 0), (d + "norm.norm.bias", 0),
                                                  (d + "scratch.output_conv0.weight", 0),
                                                  (d + "scratch.output_conv0.bias", 0),
                                                  (d + "scratch.output_conv1.2.weight", 0)])
    return TorchFlowFeatConfig(encoder, widths, features, default_hooks(num_layers))


# Where an exported file keeps its architecture: safetensors metadata key, or the JSON file beside a .pth.
ARCHITECTURE_KEY = "flowfeat_architecture"
ARCHITECTURE_FORMAT = "flowfeat-architecture/1"


def architecture_path(path: str | pathlib.Path) -> pathlib.Path:
    """`<file>.json` beside an exported .pth (torch.save files have no metadata the reference loader would keep)."""
    path = pathlib.Path(path)
    return path.with_name(path.name + ".json")


def architecture_dict(cfg: TorchFlowFeatConfig, *, family: str, pos_interp: str) -> dict:
    """Everything an import needs besides the tensors: the encoder (with its head count), its family (DINO and MAE
    share a layout) and position resizing mode ('hf' | 'hub'), the decoder widths, d and the hooks."""
    return {"format": ARCHITECTURE_FORMAT, "family": family, "pos_interp": pos_interp,
            "encoder": dataclasses.asdict(cfg.encoder), "widths": list(cfg.widths), "features": cfg.features,
            "hooks": list(cfg.hooks)}


def config_from_architecture(architecture: Mapping, where: str) -> TorchFlowFeatConfig:
    """The TorchFlowFeatConfig of an `architecture_dict`; ValueError naming `where` when it is not one."""
    try:
        if architecture.get("format") != ARCHITECTURE_FORMAT:
            raise ValueError(f"format {architecture.get('format')!r}, expected {ARCHITECTURE_FORMAT!r}")
        return TorchFlowFeatConfig(HubViTConfig(**architecture["encoder"]), tuple(architecture["widths"]),
                                   int(architecture["features"]), tuple(architecture["hooks"]))
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{where}: not a FlowFeat architecture record ({error})") from None


def read_architecture(path: str | pathlib.Path) -> dict | None:
    """The architecture an exported file carries (safetensors metadata, or `<file>.json` beside a .pth), else None
    (a released reference file). ValueError naming the file when the record is not valid JSON."""
    path = pathlib.Path(path)
    if path.suffix == ".safetensors":
        with safe_open(path, "np") as f:
            text, where = (f.metadata() or {}).get(ARCHITECTURE_KEY), f"{path} (metadata {ARCHITECTURE_KEY})"
    else:
        sidecar = architecture_path(path)
        text, where = (sidecar.read_text(), str(sidecar)) if sidecar.is_file() else (None, "")
    if text is None:
        return None
    try:
        architecture = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON ({error})") from None
    config_from_architecture(architecture, where)  # checked here, so callers get a one-line error naming the file
    return architecture


def read_state_dict(path: str | pathlib.Path) -> dict[str, torch.Tensor]:
    """A reference-layout state dict from a .pth (torch.save) or .safetensors file."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return safetensors.torch.load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return dict(state)


def load_torch_flowfeat(path_or_state: str | pathlib.Path | Mapping[str, torch.Tensor],
                        num_heads: int | None = None) -> TorchFlowFeat:
    """TorchFlowFeat with the weights of an exported file (or state dict), loaded strictly. Call .eval() to run.

    The architecture a file carries is used as it is (`num_heads`, if given, must agree); otherwise it is inferred
    from the shapes (`infer_config`)."""
    if isinstance(path_or_state, Mapping):
        state, architecture, where = path_or_state, None, "state dict"
    else:
        state, architecture, where = read_state_dict(path_or_state), read_architecture(path_or_state), path_or_state
    if architecture is not None:
        cfg = config_from_architecture(architecture, str(where))
        if num_heads is not None and num_heads != cfg.encoder.num_heads:
            raise ValueError(f"{where}: the file records {cfg.encoder.num_heads} heads, num_heads={num_heads} given")
    else:
        cfg = infer_config({k: tuple(v.shape) for k, v in state.items()}, num_heads)
    model = TorchFlowFeat(cfg)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=True)
    return model
