"""Multi-host runs: one process per host, all of them running the same program on one global mesh.

  initialize()           `jax.distributed.initialize` from the environment, before anything touches a device:
                         TPU pods (and SLURM, MPI, Kubernetes) are detected by JAX itself; elsewhere set
                         JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES, JAX_PROCESS_ID.
                         Cross-process collectives on CPU go through gloo.
  is_main_process()      process 0: the only one that prints, logs and draws progress bars
  process_rows()         the rows of a global batch whose devices this process owns
  global_batch()         a global `jax.Array` from this process's rows (`jax.make_array_from_process_local_data`)

Params that every process holds identically (a loaded parent, a transformed member) go onto a global sharding
with `jax.device_put`; the family store (Orbax) saves collectively: every process calls `save` with the
global arrays and each shard is written once, by the process that owns it, metadata by process 0.
The store directory must be shared by all hosts (a GCS path or a shared file system).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_AUTO = "PLRD_DISTRIBUTED"  # "auto": let JAX detect the cluster (TPU pod slices); set by tpu/tpu.py launch


class DistributedError(ValueError):
    """An environment that does not describe a valid multi-process run."""


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    process_id: int
    num_processes: int
    coordinator: str | None  # None when this is a single-process run


def _env_int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise DistributedError(f"{name}={env[name]!r} is not an integer") from None


def process_info_from_env(env: Mapping[str, str] | None = None) -> ProcessInfo | None:
    """The explicit multi-process setup the environment asks for; None for auto-detection or a single process.

    All three of JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, or none of them.
    """
    env = os.environ if env is None else env
    names = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
    present = [n for n in names if env.get(n)]
    if not present:
        return None
    if len(present) != len(names):
        missing = ", ".join(n for n in names if n not in present)
        raise DistributedError(f"{', '.join(present)} set but {missing} not: a multi-process run needs all of "
                               f"{', '.join(names)}")
    num, pid, address = _env_int(env, ENV_NUM_PROCESSES), _env_int(env, ENV_PROCESS_ID), env[ENV_COORDINATOR]
    if num < 1 or not 0 <= pid < num:
        raise DistributedError(f"{ENV_PROCESS_ID}={pid} must lie in [0, {ENV_NUM_PROCESSES}={num})")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise DistributedError(f"{ENV_COORDINATOR}={address!r} is not host:port")
    return ProcessInfo(pid, num, address)


def initialize(env: Mapping[str, str] | None = None) -> ProcessInfo:
    """Join the multi-process run the environment describes (a no-op for a single process).

    Call once, before any JAX computation. PLRD_DISTRIBUTED=auto leaves everything to JAX's cluster
    detection (what a TPU pod slice needs: no variables at all).
    """
    env = os.environ if env is None else env
    info = process_info_from_env(env)
    auto = env.get(ENV_AUTO, "") == "auto"
    if info is None and not auto:
        return ProcessInfo(0, 1, None)
    if info is not None and info.num_processes == 1:
        return info
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if info is None:
        jax.distributed.initialize()
        return ProcessInfo(jax.process_index(), jax.process_count(), None)
    jax.distributed.initialize(info.coordinator, info.num_processes, info.process_id)
    return info


def is_main_process() -> bool:
    return jax.process_index() == 0


@contextlib.contextmanager
def main_process_output():
    """Inside: stdout and stderr of every process but process 0 go to /dev/null (an error leaving the block
    is reported outside it, on every process)."""
    if not jax.distributed.is_initialized() or is_main_process():  # never starts a backend by itself
        yield
        return
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        yield


# ---- process-local data ---------------------------------------------------------------------------------
def process_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> slice:
    """The contiguous rows (first dimension) of a global array of `global_shape` that this process's devices
    hold under `sharding` (each process feeds exactly these)."""
    starts, stops = [], []
    for index in sharding.addressable_devices_indices_map(tuple(global_shape)).values():
        rows = index[0]
        start, stop, _ = rows.indices(global_shape[0])
        starts.append(start)
        stops.append(stop)
    lo, hi = min(starts), max(stops)
    covered = np.zeros(hi - lo, bool)
    for a, b in zip(starts, stops):
        covered[a - lo:b - lo] = True
    if not covered.all():
        raise DistributedError(f"this process's devices hold non-contiguous rows of a {global_shape} batch; "
                               "order the mesh so that each host's devices are adjacent along the batch axes")
    return slice(lo, hi)


def global_batch(local_rows: np.ndarray, sharding: NamedSharding, global_shape: tuple[int, ...]) -> jax.Array:
    """The global array of `global_shape` whose rows `process_rows(sharding, global_shape)` are `local_rows`."""
    return jax.make_array_from_process_local_data(sharding, np.asarray(local_rows), tuple(global_shape))


def batch_sharding_of(mesh: Mesh) -> NamedSharding:
    from plrd_jax.nn.sharding import batch_sharding

    return batch_sharding(mesh)
