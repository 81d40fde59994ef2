"""Registry of flow methods for the exporter: ``make_flow_method(name, ...)`` -> callable.

Every method maps two uint8 batches (N, F, F, 3) to the flow from the first to the second in pixels, float32
(N, F, F, 2); the exporter converts to the normalised units of recipe.md step 2. Torch-based methods are imported
only when asked for, so 'dis' needs neither torch nor a checkpoint.
"""

import os
from collections.abc import Callable

import numpy as np

FlowFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
METHODS = ("dis", "searaft", "raft")


def make_flow_method(
    name: str, checkpoint: str | os.PathLike | None = None, device: str = "cpu", iters: int | None = None
) -> FlowFn:
    """Builds flow method ``name`` ('dis' | 'searaft' | 'raft').

    Args:
      name: method name.
      checkpoint: weights file of a network method (required for 'searaft' and 'raft'; 'dis' takes none).
      device: torch device of a network method ('cpu' or 'cuda').
      iters: refinement iterations of a network method; None = the method's default (recipe.md step 9: SEA-RAFT M 4,
        RAFT 20).
    """
    if name == "dis":
        if checkpoint is not None:
            raise ValueError(f"flow method 'dis' takes no checkpoint (got {checkpoint})")
        from flowfeat_jax.flow.dis import DisFlow  # noqa: PLC0415  (OpenCV only for this method)

        return DisFlow()
    if name not in METHODS:
        raise ValueError(f"unknown flow method {name!r}; choose one of {METHODS}")
    if checkpoint is None:
        raise ValueError(f"flow method {name!r} needs --checkpoint (its weights file)")
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"flow checkpoint not found: {checkpoint}")
    if name == "searaft":
        from flowfeat_jax.flow.searaft import SeaRaftFlow  # noqa: PLC0415  (torch: network methods only)

        return SeaRaftFlow(checkpoint, device=device, iters=iters)
    try:
        from flowfeat_jax.flow.raft import RaftFlow  # noqa: PLC0415  (torch: network methods only)
    except ModuleNotFoundError as e:
        if e.name != "flowfeat_jax.flow.raft":
            raise
        raise NotImplementedError(
            "flow method 'raft' is not available: flowfeat_jax/flow/raft.py is not part of this build; use 'searaft'"
        ) from e
    return RaftFlow(checkpoint, device=device, iters=iters)
