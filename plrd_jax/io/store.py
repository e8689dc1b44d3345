"""The family store: one directory, one Orbax `CheckpointManager`, steps index the family.

A family run gives each stage (member) k a block of step ids `[start_k, start_k + heal_steps_k]`; step
`start_k + t` holds member k after t healing steps. The last step of a block is the member's *final*
checkpoint, kept forever; the periodic healing checkpoints in between are kept only as the latest few (they
exist for resume). Each step has three items:

  params     the member's param tree (restored onto given shardings from abstract arrays)
  opt_state  optimizer state (periodic checkpoints only)
  metadata   JSON: member index and name, method, model config with its ranks, parameter count, compression
             ratio, tokens seen, schedule, data spec, eval results, final flag
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any, Sequence

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from plrd_jax.io.output import check_writable
from plrd_jax.nn.config import ModelConfig
from plrd_jax.nn.model import abstract_params


class StoreError(ValueError):
    """A family directory or member reference that cannot be used."""


@dataclasses.dataclass
class KeepFinalMembers(policies.PreservationPolicy):
    """Preserve every checkpoint whose metadata says it is a finished member (read from disk, so it holds
    for members written by earlier runs and other methods too)."""

    directory: str

    def should_preserve(self, checkpoints, *, context):
        return [_is_final(self.directory, c.step) for c in checkpoints]


def _is_final(directory: str, step: int) -> bool:
    try:
        with open(os.path.join(directory, str(step), "metadata", "metadata")) as f:
            return bool(json.load(f).get("final"))
    except (OSError, ValueError):
        return False


TMP_MARK = ".orbax-checkpoint-tmp"  # what Orbax appends to a step (or item) directory while it is being saved


def remove_interrupted_saves(directory: str) -> list[str]:
    """Delete the step directories an interrupted save left behind (`N.orbax-checkpoint-tmp...`); they hold no
    finished checkpoint (Orbax renames a step into place only once all of it is written). Returns their names."""
    import shutil

    if not os.path.isdir(directory) or jax.process_index() != 0:
        return []
    names = sorted(n for n in os.listdir(directory) if TMP_MARK in n)
    for name in names:
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    return names


@contextlib.contextmanager
def _quiet_absl(quiet: bool):
    from absl import logging as absl_logging

    level = absl_logging.get_verbosity()
    if quiet:
        absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(level)


class FamilyStore:
    """A whole family in one Orbax directory, one checkpoint per step id (docs/store.md has the layout).

    save(step, params, metadata, opt_state=None) writes a step (JSON metadata beside the arrays); steps() lists
    the finished ones; metadata(step) and restore(step, abstract_params, abstract_opt_state=None) read one back
    (placed like the abstract arrays' shardings); members() / find_member("2" or "plrd-60%") give the final
    members' metadata. Final members are always kept; of the other (periodic) checkpoints the newest
    `keep_latest`. Opening for writing removes the temporary folders of an interrupted save.
    """

    def __init__(self, directory: str | os.PathLike, keep_latest: int = 2, read_only: bool = False):
        self.directory = os.path.abspath(os.fspath(directory))
        if read_only and not os.path.isdir(self.directory):
            raise StoreError(f"family directory {self.directory} does not exist")
        if not read_only:  # an unwritable location fails here, by name, not inside Orbax
            check_writable(os.fspath(directory))
            remove_interrupted_saves(self.directory)  # read-only opens skip them (Orbax lists finished steps only)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy([policies.LatestN(keep_latest), KeepFinalMembers(self.directory)]),
            read_only=read_only,
            create=not read_only,
            cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=False,  # a family checkpoint is small next to the step time on CPU
            **({"save_interval_steps": 0} if read_only else {}),
        )
        with _quiet_absl(read_only):  # Orbax warns that a read-only directory is read-only
            self.manager = ocp.CheckpointManager(self.directory, options=options,
                                                 item_names=("params", "opt_state", "metadata"))

    # ---- writing --------------------------------------------------------------------------------
    def save(self, step: int, params, metadata: dict[str, Any], opt_state=None) -> None:
        items = {"params": ocp.args.StandardSave(params), "metadata": ocp.args.JsonSave(metadata)}
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()

    # ---- reading --------------------------------------------------------------------------------
    def steps(self) -> Sequence[int]:
        return sorted(self.manager.all_steps())

    def metadata(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]

    def members(self) -> list[dict[str, Any]]:
        """Metadata of every finished member, in member order."""
        out = [m for m in (self.metadata(s) for s in self.steps()) if m.get("final")]
        return sorted(out, key=lambda m: m["member"])

    def members_named(self, name: str) -> list[dict[str, Any]]:
        """Metadata of every finished member called `name` (one, unless earlier versions stored duplicates)."""
        return [m for m in self.members() if m.get("name") == name]

    def find_member(self, ref: str) -> dict[str, Any]:
        """A finished member by index ("2") or name ("plrd-60%")."""
        members = self.members()
        for m in members:
            if str(m["member"]) == ref or m.get("name") == ref:
                return m
        names = ", ".join(f"{m['member']} ({m.get('name')})" for m in members) or "none yet"
        raise StoreError(f"no member {ref!r} in {self.directory}; finished members: {names}")

    def restore(self, step: int, abstract_params, abstract_opt_state=None):
        """(params, opt_state or None) at `step`, placed like the abstract arrays' shardings."""
        items = {"params": ocp.args.StandardRestore(abstract_params)}
        if abstract_opt_state is not None:
            items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        return out["params"], (out["opt_state"] if abstract_opt_state is not None else None)


def split_member_spec(spec: str) -> tuple[str, str] | None:
    """"DIR:N" or "DIR:NAME" -> (DIR, ref) when DIR is a family directory, else None."""
    if ":" not in spec:
        return None
    directory, ref = spec.rsplit(":", 1)
    if not os.path.isdir(directory):
        return None
    return directory, ref


def load_member(spec: str):
    """(config, params, metadata) of a stored member "FAMILY_DIR:N" or "FAMILY_DIR:NAME"."""
    parsed = split_member_spec(spec)
    if parsed is None:
        raise StoreError(f"{spec!r} is not FAMILY_DIR:N or FAMILY_DIR:NAME with an existing directory")
    directory, ref = parsed
    store = FamilyStore(directory, read_only=True)
    meta = store.find_member(ref)
    config = ModelConfig.from_dict(meta["config"])
    params, _ = store.restore(meta["step"], abstract_params(config))
    return config, params, meta
