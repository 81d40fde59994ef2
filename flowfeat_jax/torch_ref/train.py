"""The released FlowFeat train step in plain eager torch (fp32), for benchmarks and cross-checks of train/step.py.

One step follows model.py `FlowFeatTrain.forward` + train.py of the reference (recipe.md steps 2-8), with the flow
already computed (as in this project's records, so flow-network time is left out on both sides):
  1. standardise the teacher flow per image and channel (unbiased std, +1e-5);
  2. two crops of the normalised frame and the flow with `F.affine_grid` / `F.grid_sample` (bilinear, zeros,
     align_corners=False) from the given thetas;
  3. the frozen encoder runs on crop 1 and on crop 2 (two calls, under no_grad); the EMA decoder embeds crop 1
     (no_grad), the online decoder crop 2;
  4. ridge map from the EMA features to crop 1's flow with `torch.linalg.lstsq` (model.py `forward_flow`), applied to
     the online features;
  5. loss = grad_weight * focal gradient loss (edge_l1norm) + flow_weight * L1; AdamW step; ema_pytorch update.

    trainer = TorchFlowFeatTrainer(model, TorchStepConfig())
    losses = trainer.step(frames, flow, theta1, theta2)  # NCHW float32; thetas (B, 2, 3)
"""

import copy
import dataclasses

import torch
import torch.nn.functional as F

from flowfeat_jax.torch_ref.flowfeat import TorchFlowFeat

STANDARDIZE_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class TorchStepConfig:
    """Released constants (config/ytvos.yaml; names as train/step.py StepConfig and config.train)."""

    input_size: int = 224
    lr: float = 1e-4
    b1: float = 0.9
    b2: float = 0.999
    weight_decay: float = 0.0
    norm_flow: bool = True
    flow_weight: float = 0.1
    grad_weight: float = 1.0
    sigma: float = 0.1
    ridge_alpha: float = 0.1
    ema_beta: float = 0.999
    ema_update_after_step: int = 1
    ema_update_every: int = 5
    ema_power: float = 2.0 / 3.0
    ema_inv_gamma: float = 1.0


def standardize_flow(flow: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W) -> per image and channel (f - mean) / (std + 1e-5), torch's unbiased std (model.py forward)."""
    mean = flow.mean((2, 3), keepdim=True)
    std = flow.std((2, 3), keepdim=True)
    return (flow - mean) / (std + STANDARDIZE_EPS)


def crop_view(images: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
    """model.py `crop_view`: bilinear sample of (B, C, H, W) on the affine grid of theta, zero padding."""
    grid = F.affine_grid(theta, (images.shape[0], 1, size, size), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _pixels(x: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W) -> (B, H*W, D)."""
    return x.flatten(2, 3).movedim(1, -1)


def _with_ones(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones_like(x[..., :1])], -1)


def ridge_flow(flow: torch.Tensor, teacher: torch.Tensor, student: torch.Tensor, alpha: float) -> torch.Tensor:
    """model.py `forward_flow`: A = lstsq(X̃ᵀX̃/N + αI, X̃ᵀU/N) on the teacher features, prediction X̃_student A.

    flow (B, c, H, W), teacher / student features (B, d, H, W) -> predicted flow (B, c, H, W).
    """
    batch, _, height, width = student.shape
    with torch.autocast(student.device.type, enabled=False):  # the Gram matrix and its solve stay f32 under autocast
        return _ridge_flow_f32(flow.float(), teacher.float(), student.float(), alpha, (batch, height, width))


def _ridge_flow_f32(flow, teacher, student, alpha, shape):
    batch, height, width = shape
    target = _pixels(flow)
    x = _with_ones(_pixels(teacher))
    lhs = x.transpose(-1, -2) @ x / x.shape[1]
    lhs = lhs + alpha * torch.eye(x.shape[-1], dtype=lhs.dtype, device=lhs.device)[None]
    rhs = x.transpose(-1, -2) @ target / x.shape[1]
    coef = torch.linalg.lstsq(lhs, rhs).solution
    pred = _with_ones(_pixels(student)) @ coef
    return pred.movedim(1, -1).reshape(batch, -1, height, width)


def flow_l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """model.py `flow_l1`: mean over pixels of the channel-summed absolute error."""
    return (pred - target).abs().sum(1).mean()


def focal_gradient_loss(pred: torch.Tensor, target: torch.Tensor, sigma: float) -> torch.Tensor:
    """model.py `flow_boundary_loss` with `edge_l1norm`: per axis, weights 1 - exp(-|∇U|/σ) normalised over H×W per
    image and channel, times |∇Û - ∇U|, summed over H×W and averaged; x and y terms added."""

    def axis_term(pred_edges, target_edges):
        weight = 1.0 - torch.exp(-target_edges / sigma)
        weight = weight / weight.sum((-1, -2), keepdim=True)
        return (weight * (pred_edges - target_edges).abs()).sum((-1, -2)).mean()

    def grad_x(f):
        return (f[..., :-1] - f[..., 1:]).abs()

    def grad_y(f):
        return (f[..., :-1, :] - f[..., 1:, :]).abs()

    return axis_term(grad_x(pred), grad_x(target)) + axis_term(grad_y(pred), grad_y(target))


class EmaTeacher:
    """util/ema_pytorch.py `EMA` schedule: on call k = 1 copy; then every `update_every` calls copy while
    k - 1 <= update_after_step, else lerp with decay clip(1 - (1 + epoch/inv_gamma)^-power, 0, beta)."""

    def __init__(self, online: torch.nn.Module, cfg: TorchStepConfig):
        self.model = copy.deepcopy(online).requires_grad_(False)
        self.cfg = cfg
        self.calls = 0

    def decay(self) -> float:
        epoch = max(self.calls - self.cfg.ema_update_after_step - 1, 0)
        if epoch == 0:
            return 0.0
        value = 1.0 - (1.0 + epoch / self.cfg.ema_inv_gamma) ** (-self.cfg.ema_power)
        return min(max(value, 0.0), self.cfg.ema_beta)

    @torch.no_grad()
    def update(self, online: torch.nn.Module) -> None:
        self.calls += 1
        k, cfg = self.calls, self.cfg
        if k != 1 and (k - 1) % cfg.ema_update_every:
            return
        pairs = list(zip(self.model.parameters(), online.parameters()))
        if k == 1 or k - 1 <= cfg.ema_update_after_step:
            for ema, param in pairs:
                ema.copy_(param)
            return
        weight = 1.0 - self.decay()
        for ema, param in pairs:
            ema.lerp_(param, weight)


class TorchFlowFeatTrainer:
    """The online decoder, its AdamW optimiser and the EMA teacher of a TorchFlowFeat (encoder frozen)."""

    def __init__(self, model: TorchFlowFeat, cfg: TorchStepConfig):
        self.model, self.cfg = model, cfg
        model.encoder.requires_grad_(False).eval()
        model.decoder.train()
        self.optimizer = torch.optim.AdamW(
            model.decoder.parameters(), lr=cfg.lr, betas=(cfg.b1, cfg.b2), eps=1e-8, weight_decay=cfg.weight_decay
        )
        self.ema = EmaTeacher(model.decoder, cfg)

    def losses(self, frames: torch.Tensor, flow: torch.Tensor, theta1: torch.Tensor, theta2: torch.Tensor) -> dict:
        """The objective of one batch: frames (B, 3, S, S) ImageNet-normalised, flow (B, 2, F, F) in normalised
        units, thetas (B, 2, 3). Returns {"loss", "flow_loss", "grad_loss"} (differentiable w.r.t. the decoder)."""
        cfg, model = self.cfg, self.model
        hw = (cfg.input_size, cfg.input_size)
        if cfg.norm_flow:
            flow = standardize_flow(flow)
        crop1, crop2 = crop_view(frames, theta1, cfg.input_size), crop_view(frames, theta2, cfg.input_size)
        flow1, flow2 = crop_view(flow, theta1, cfg.input_size), crop_view(flow, theta2, cfg.input_size)
        hooks = model.cfg.hooks
        with torch.no_grad():
            teacher = self.ema.model(model.encoder(crop1, hooks), hw)
            hooked2 = model.encoder(crop2, hooks)
        student = model.decoder(hooked2, hw)
        pred = ridge_flow(flow1, teacher, student, cfg.ridge_alpha)
        flow_term = flow_l1_loss(pred, flow2)
        grad_term = focal_gradient_loss(pred, flow2, cfg.sigma)
        return {"loss": cfg.grad_weight * grad_term + cfg.flow_weight * flow_term, "flow_loss": flow_term,
                "grad_loss": grad_term}

    def step(self, frames: torch.Tensor, flow: torch.Tensor, theta1: torch.Tensor, theta2: torch.Tensor) -> dict:
        """One optimiser step (loss, backward, AdamW, EMA update); returns the detached loss terms."""
        terms = self.losses(frames, flow, theta1, theta2)
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        self.optimizer.step()
        self.ema.update(self.model.decoder)
        return {k: v.detach() for k, v in terms.items()}
