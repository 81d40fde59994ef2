"""Data parallelism over every device of every process: a 1-D `data` mesh, batches sharded, state replicated.

The train step itself is unchanged: jit partitions it from the input shardings (GSPMD), so one device, N local devices
and N hosts run the same program on the same global batch. A second mesh axis (e.g. `fsdp`) can be added here if the
decoder ever outgrows one device.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
# Environment variables that mean "this process is one of several" (jax.distributed reads them itself).
_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def initialize_distributed() -> None:
    """Joins a multi-host run when the environment describes one (explicit coordinator, or SLURM with > 1 task)."""
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    if slurm or any(name in os.environ for name in _CLUSTER_ENV):
        jax.distributed.initialize()


def data_mesh() -> Mesh:
    # Auto axes: XLA propagates the batch sharding through the step (no sharding annotations in the model code).
    return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def local_batch_size(global_batch: int, mesh: Mesh) -> int:
    """This process's share of the global batch; the global batch must split evenly over all devices."""
    devices = mesh.devices.size
    if global_batch % devices:
        raise ValueError(f"train.batch_size={global_batch} must be a multiple of the number of devices ({devices})")
    return global_batch // jax.process_count()


def replicate(tree: Any, mesh: Mesh) -> Any:
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def shard_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays from each process's slice of the batch (leading axis split over the `data` axis)."""
    sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
