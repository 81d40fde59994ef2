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
  5. loss = grad_weight * focal gradient loss (edge_l1norm) + flow_weight * L1 (or L2); AdamW step; ema_pytorch
     update.

    cfg = TorchStepConfig.from_sections(config.train, config.loss, config.ema)
    trainer = TorchFlowFeatTrainer(model, cfg)
    losses = trainer.step(frames, flow, theta1, theta2)  # NCHW float32; thetas (B, 2, 3)

The formulas here are the one torch reference of the parity tests (tests/test_losses.py, test_ridge.py, test_ema.py,
test_train_step.py).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from flowfeat_jax import settings
from flowfeat_jax.torch_ref.flowfeat import TorchFlowFeat

STANDARDIZE_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class TorchStepConfig:
    """The settings of the torch step: the same dataclasses as train/step.py StepConfig, plus AdamW's (config.train)."""

    input_size: int
    adamw: settings.AdamWConfig
    loss: settings.LossConfig
    ema: settings.EmaConfig

    @classmethod
    def from_sections(cls, train: Mapping, loss: Mapping, ema: Mapping) -> TorchStepConfig:
        """From the config sections `train` (crop side and optimiser fields), `loss` and `ema` (whole)."""
        return cls(
            input_size=train["input_size"],
            adamw=settings.from_section(settings.AdamWConfig, train),
            loss=settings.LossConfig(**loss),
            ema=settings.EmaConfig(**ema),
        )


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


def ridge_solve(flow: torch.Tensor, teacher: torch.Tensor, alpha: float) -> torch.Tensor:
    """model.py `forward_flow`, its map: A = lstsq(X̃ᵀX̃/N + αI, X̃ᵀU/N), X̃ the teacher features with a ones column.

    flow (B, c, H, W), teacher features (B, d, H, W) -> A (B, d+1, c), f32 (also under autocast).
    """
    with torch.autocast(teacher.device.type, enabled=False):  # the Gram matrix and its solve stay f32 under autocast
        target = _pixels(flow.float())
        x = _with_ones(_pixels(teacher.float()))
        lhs = x.transpose(-1, -2) @ x / x.shape[1]
        lhs = lhs + alpha * torch.eye(x.shape[-1], dtype=lhs.dtype, device=lhs.device)[None]
        rhs = x.transpose(-1, -2) @ target / x.shape[1]
        return torch.linalg.lstsq(lhs, rhs).solution


def ridge_predict(student: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """model.py `forward_flow`, its prediction X̃_student A: (B, d, H, W), A (B, d+1, c) -> (B, c, H, W), f32."""
    batch, _, height, width = student.shape
    with torch.autocast(student.device.type, enabled=False):
        pred = _with_ones(_pixels(student.float())) @ coef
    return pred.movedim(1, -1).reshape(batch, -1, height, width)


def ridge_flow(flow: torch.Tensor, teacher: torch.Tensor, student: torch.Tensor, alpha: float) -> torch.Tensor:
    """model.py `forward_flow`: the ridge map from the teacher features to `flow`, applied to the student features.

    flow (B, c, H, W), teacher / student features (B, d, H, W) -> predicted flow (B, c, H, W).
    """
    return ridge_predict(student, ridge_solve(flow, teacher, alpha))


def flow_l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """model.py `flow_l1`: mean over pixels of the channel-summed absolute error."""
    return (pred - target).abs().sum(1).mean()


def flow_l2_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """model.py `flow_l2` (the "L2" ablation): F.mse_loss, the mean over all elements."""
    return F.mse_loss(pred, target)


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


def flow_objective(cfg: settings.LossConfig, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Eq. 7 as model.py FlowFeatTrain.forward: grad_weight * L_grad + flow_weight * L_flow (L1, or the L2 ablation)."""
    flow_term = flow_l1_loss(pred, target) if cfg.flow == "l1" else flow_l2_loss(pred, target)
    grad_term = focal_gradient_loss(pred, target, cfg.sigma)
    return {"loss": cfg.grad_weight * grad_term + cfg.flow_weight * flow_term, "flow_loss": flow_term,
            "grad_loss": grad_term}


class EmaTeacher:
    """util/ema_pytorch.py `EMA.update()` transcribed, with its step counter and `initted` flag: the first call
    copies the online weights; afterwards a call whose step (calls before it) is a multiple of `update_every` copies
    while step <= update_after_step, else lerps with `decay()` (not at all when beta = 1: ema_pytorch's frozen EMA);
    every other call leaves the EMA as it is."""

    def __init__(self, online: torch.nn.Module, cfg: settings.EmaConfig):
        self.model = copy.deepcopy(online).requires_grad_(False)
        self.cfg = cfg
        self.step, self.initted = 0, False

    def decay(self) -> float:
        """ema_pytorch `get_current_decay` (min_value 0): clip(1 - (1 + epoch/inv_gamma)^-power, 0, beta) with
        epoch = step - update_after_step - 1, 0 while epoch <= 0."""
        epoch = max(self.step - self.cfg.update_after_step - 1, 0)
        if epoch == 0:
            return 0.0
        value = 1.0 - (1.0 + epoch / self.cfg.inv_gamma) ** (-self.cfg.power)
        return min(max(value, 0.0), self.cfg.beta)

    @torch.no_grad()
    def update(self, online: torch.nn.Module) -> float:
        """One call; returns the decay it used: 0.0 on a copy, 1.0 when it left the EMA unchanged (as train/ema.py)."""
        step, cfg = self.step, self.cfg
        self.step += 1
        pairs = list(zip(self.model.parameters(), online.parameters()))
        if not self.initted or (step % cfg.update_every == 0 and step <= cfg.update_after_step):
            self.initted = True
            for ema, param in pairs:
                ema.copy_(param)
            return 0.0
        if step % cfg.update_every or cfg.beta == 1.0:
            return 1.0
        decay = self.decay()
        for ema, param in pairs:
            ema.lerp_(param, 1.0 - decay)
        return decay


class TorchFlowFeatTrainer:
    """The online decoder, its AdamW optimiser and the EMA teacher of a TorchFlowFeat (encoder frozen)."""

    def __init__(self, model: TorchFlowFeat, cfg: TorchStepConfig):
        if cfg.loss.flow_map != "ridge":
            raise ValueError(f"the torch reference step has the ridge map only, got loss.flow_map={cfg.loss.flow_map!r}")
        self.model, self.cfg = model, cfg
        model.encoder.requires_grad_(False).eval()
        model.decoder.train()
        adamw = cfg.adamw
        self.optimizer = torch.optim.AdamW(
            model.decoder.parameters(), lr=adamw.lr, betas=(adamw.b1, adamw.b2), eps=1e-8,
            weight_decay=adamw.weight_decay,
        )
        self.ema = EmaTeacher(model.decoder, cfg.ema)

    def losses(self, frames: torch.Tensor, flow: torch.Tensor, theta1: torch.Tensor, theta2: torch.Tensor) -> dict:
        """The objective of one batch: frames (B, 3, S, S) ImageNet-normalised, flow (B, 2, F, F) in normalised
        units, thetas (B, 2, 3). Returns {"loss", "flow_loss", "grad_loss"} (differentiable w.r.t. the decoder)."""
        cfg, model = self.cfg, self.model
        hw = (cfg.input_size, cfg.input_size)
        if cfg.loss.norm_flow:
            flow = standardize_flow(flow)
        crop1, crop2 = crop_view(frames, theta1, cfg.input_size), crop_view(frames, theta2, cfg.input_size)
        flow1, flow2 = crop_view(flow, theta1, cfg.input_size), crop_view(flow, theta2, cfg.input_size)
        hooks = model.cfg.hooks
        with torch.no_grad():
            # ema.enabled False: the teacher is the online decoder, without gradient (train/step.py).
            teacher = (self.ema.model if cfg.ema.enabled else model.decoder)(model.encoder(crop1, hooks), hw)
            hooked2 = model.encoder(crop2, hooks)
        student = model.decoder(hooked2, hw)
        pred = ridge_flow(flow1, teacher, student, cfg.loss.ridge_alpha)
        return flow_objective(cfg.loss, pred, flow2)

    def step(self, frames: torch.Tensor, flow: torch.Tensor, theta1: torch.Tensor, theta2: torch.Tensor) -> dict:
        """One optimiser step (loss, backward, AdamW, EMA update); returns the detached loss terms."""
        terms = self.losses(frames, flow, theta1, theta2)
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        self.optimizer.step()
        self.ema.update(self.model.decoder)
        return {k: v.detach() for k, v in terms.items()}
