"""Per-image ridge regression from features to flow with a bias column (recipe step 5).

Mirrors model.py `FlowFeatTrain.forward_flow`. With X (N×d) the teacher-crop features of one image (N = H·W
pixels), X̃ = [X, 1] and U (N×c) its flow, the reference solves

    (X̃ᵀX̃/N + αI) A = X̃ᵀU/N,      A ∈ R^{(d+1)×c},

the normal equations of min_A ||X̃A − U||²/N + α||A||² (the bias row of A is regularised too: the reference adds
αI to the whole (d+1)×(d+1) matrix). It calls torch.linalg.lstsq on this square system; for α > 0 the matrix is
symmetric positive definite, so its unique solution is the one `jnp.linalg.solve` returns.

X̃ is never materialised (at batch 128 and 224² pixels it would be gigabytes): with s = Σ_n x_n and u = Σ_n u_n,
    X̃ᵀX̃ = [[XᵀX, s], [sᵀ, N]],   X̃ᵀU = [[XᵀU], [uᵀ]].
All of it runs in float32 with HIGHEST matmul precision, whatever the feature dtype (house rule: the Gram matrix
and its solve are f32; GPU TF32 defaults would cost ~3 significant digits).
"""

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def _pixels(x: jax.Array, name: str) -> jax.Array:
    """(B, H, W, D) → (B, N, D) float32."""
    if x.ndim != 4:
        raise ValueError(f"{name} must be (B, H, W, D), got {x.shape}")
    return x.reshape(x.shape[0], -1, x.shape[-1]).astype(jnp.float32)


def ridge_solve(features: jax.Array, flow: jax.Array, alpha: float = 0.1) -> jax.Array:
    """Ridge weights A = (X̃ᵀX̃/N + αI)⁻¹ X̃ᵀU/N per image (recipe step 5; model.py `forward_flow`).

    Args:
      features: (B, H, W, d) teacher features X (EMA decoder on crop 1).
      flow: (B, H, W, c) teacher flow U on crop 1.
      alpha: ridge strength α (released `ridge_alpha` 0.1).

    Returns:
      A: (B, d + 1, c) float32; row d is the bias.
    """
    if features.shape[:3] != flow.shape[:3]:
        raise ValueError(f"features {features.shape} and flow {flow.shape} must share (B, H, W)")
    x = _pixels(features, "features")  # B N d
    u = _pixels(flow, "flow")  # B N c
    batch, num_pixels, dim = x.shape
    gram = jnp.einsum("bnd,bne->bde", x, x, precision=_HIGHEST)  # B d d
    feature_sum = jnp.sum(x, axis=1)  # B d
    lhs = jnp.concatenate(
        [
            jnp.concatenate([gram, feature_sum[:, :, None]], axis=2),
            jnp.concatenate([feature_sum[:, None, :], jnp.full((batch, 1, 1), num_pixels, jnp.float32)], axis=2),
        ],
        axis=1,
    )  # B d+1 d+1
    lhs = lhs / num_pixels + alpha * jnp.eye(dim + 1, dtype=jnp.float32)
    cross = jnp.einsum("bnd,bnc->bdc", x, u, precision=_HIGHEST)  # B d c
    rhs = jnp.concatenate([cross, jnp.sum(u, axis=1, keepdims=True)], axis=1) / num_pixels  # B d+1 c
    return jnp.linalg.solve(lhs, rhs)


def ridge_predict(features: jax.Array, weights: jax.Array) -> jax.Array:
    """Û = [X, 1] A per image (recipe step 5; model.py `forward_flow` prediction), float32.

    Args:
      features: (B, H, W, d) student features X (online decoder on crop 2).
      weights: (B, d + 1, c) from `ridge_solve`.

    Returns:
      (B, H, W, c) float32.
    """
    if features.ndim != 4 or weights.ndim != 3 or weights.shape[:2] != (features.shape[0], features.shape[-1] + 1):
        raise ValueError(f"weights must be (B, d+1, c) for features (B, H, W, d): {weights.shape} vs {features.shape}")
    weights = weights.astype(jnp.float32)
    linear = jnp.einsum("bhwd,bdc->bhwc", features.astype(jnp.float32), weights[:, :-1], precision=_HIGHEST)
    return linear + weights[:, None, None, -1]
