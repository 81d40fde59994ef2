"""Orbax checkpoints of a FlowFeat run: train state, run metadata and (when present) the data iterator.

Layout: `workdir/checkpoints/<step>/{state,meta[,data]}` written by one `ocp.CheckpointManager` (atomic: orbax
renames a finished temporary directory, so a half-written step is never picked up). `meta` holds the config and the
frozen encoder's source and SHA-256 digest instead of its weights (style.md section 5).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from flowfeat_jax import cli

# After a failed write: how long the writes still in flight get to fail quietly before the error is reported.
_DRAIN_S = 2.0


def _path_name(path: tuple) -> str:
    """A canonical name of a pytree path: keys and indices as plain strings joined by '/' (so an int key 0 and the
    string key '0' that orbax restores without a template name the same leaf)."""
    parts = []
    for entry in path:
        for attr in ("key", "idx", "name"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
    return "/".join(parts)


def tree_digest(tree: Any) -> str:
    """SHA-256 over a pytree's leaves (path, dtype, shape, bytes); stable across runs and machines for equal arrays."""
    digest = hashlib.sha256()
    leaves = [(_path_name(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]
    for name, leaf in sorted(leaves, key=lambda kv: kv[0]):
        arr = np.asarray(jax.device_get(leaf))
        digest.update(name.encode())
        digest.update(str(arr.dtype).encode())
        digest.update(str(arr.shape).encode())
        digest.update(np.ascontiguousarray(arr).tobytes())
    return digest.hexdigest()


class Checkpointer:
    """Saves the steps it is asked to, keeps the last `keep`, restores any of them (the caller picks when to save)."""

    def __init__(self, directory: str | pathlib.Path, *, keep: int = 3):
        self.directory = pathlib.Path(directory).absolute()
        # Synchronous saves: a failed write (full disk) then surfaces inside `save`, where what its writer threads
        # print can be held back, instead of in a background thread at any later point of training.
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict, data_iterator: Any = None) -> bool:
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_iterator is not None:
            import grain

            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        # A failed write leaves the other arrays' writes failing in tensorstore threads, each printing a traceback
        # ("Event loop is closed"; hundreds on a full disk): held back, and given _DRAIN_S to finish.
        with jax.transfer_guard("allow"), self._write_errors(step), cli.stderr_kept_on_success(_DRAIN_S):
            return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    @contextlib.contextmanager
    def _write_errors(self, step: int | None):
        """A failed write (disk full, read-only folder; orbax saves in the background, so it may surface at the next
        save or at close) in one line that names the folder; the rename-on-commit keeps earlier steps intact."""
        try:
            yield
        except (OSError, ValueError) as e:
            if isinstance(e, OSError):
                reason = f"{e.strerror or e} ({e.filename or 'orbax'})"
            elif "No space left" in str(e) or "RESOURCE_EXHAUSTED" in str(e):  # tensorstore's error on a full disk
                reason = f"No space left on device ({' '.join(str(e).split())[:160]})"
            else:
                raise
            what = f"checkpoint {step}" if step is not None else "the last checkpoint"
            raise OSError(
                f"cannot write {what} in {self.directory}: {reason}; "
                "the earlier checkpoints are intact, free space and rerun to resume"
            ) from e

    def restore(self, step: int, abstract_state: Any, data_iterator: Any = None) -> tuple[Any, dict]:
        """Restores `step` into the structure of `abstract_state` (and the data iterator in place).

        A dataclass state whose optional fields are None (TrainState.flow_head) also restores a checkpoint written
        before those fields existed: they keep their None.
        """
        try:
            return self._restore(step, abstract_state, data_iterator)
        except ValueError as error:
            fields = dataclasses.fields(abstract_state) if dataclasses.is_dataclass(abstract_state) else ()
            older = {f.name: getattr(abstract_state, f.name) for f in fields if getattr(abstract_state, f.name) is not None}
            if len(older) == len(fields):
                raise
            try:
                state, meta = self._restore(step, older, data_iterator)
            except ValueError:
                raise error from None  # the first error names the mismatch; the retry only dropped the unset fields
            return abstract_state.replace(**state), meta

    def _restore(self, step: int, abstract_state: Any, data_iterator: Any) -> tuple[Any, dict]:
        items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
        if data_iterator is not None and not (self.directory / str(step) / "data").is_dir():
            # An imported checkpoint has no data item: the data order starts afresh.
            logging.warning("%s holds no data-iterator state; the data order starts from the beginning", step)
        elif data_iterator is not None:
            import grain

            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        with jax.transfer_guard("allow"), self._read_errors(step):
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored.state, restored.meta

    def restore_meta(self, step: int) -> dict:
        with self._read_errors(step):
            restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored.meta

    def restore_raw(self, step: int) -> tuple[dict, dict]:
        """(state as nested dicts, meta) without a template: for inspection, not for training."""
        items = {"state": ocp.args.StandardRestore(), "meta": ocp.args.JsonRestore()}
        with jax.transfer_guard("allow"), self._read_errors(step):
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored.state, restored.meta

    @contextlib.contextmanager
    def _read_errors(self, step: int):
        """A damaged or mismatched checkpoint in one line that names its folder."""
        try:
            yield
        except Exception as e:
            if not isinstance(e, (OSError, ValueError)) and type(e) is not Exception:
                raise  # a bug, not a damaged file
            cause = e.__cause__ if type(e) is Exception and e.__cause__ is not None else e  # orbax wraps tensorstore's
            message = " ".join(str(cause).split()).split(" [tensorstore_spec=")[0]
            raise ValueError(f"cannot read checkpoint {self.directory / str(step)}: {message[:400]}") from e

    def wait(self) -> None:
        with self._write_errors(None):
            self._manager.wait_until_finished()

    def close(self) -> None:
        with self._write_errors(None):
            self._manager.wait_until_finished()
            # Not after a failed save: closing shuts orbax's event loop while tensorstore still completes the other
            # arrays' writes, whose callbacks then print "Event loop is closed" tracebacks (hundreds on a full disk).
            self._manager.close()  # re-raises a failed background save


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs of a pytree, the restore target orbax needs."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def check_same_encoder(meta: dict, encoder_source: str, encoder_digest: str, path: pathlib.Path) -> None:
    """Refuses to resume a run onto a different frozen encoder (issue 4, item 3)."""
    saved = meta.get("encoder", {})
    if saved.get("digest") != encoder_digest:
        saved_digest = str(saved.get("digest"))[:12]
        raise ValueError(
            f"{path}: checkpoint was trained on encoder {saved.get('source')!r} (digest {saved_digest}), "
            f"but this run builds {encoder_source!r} (digest {encoder_digest[:12]}); use another --workdir"
        )
    logging.info("encoder matches checkpoint: %s", encoder_source)
