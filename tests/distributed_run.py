"""A tiny two-member family run for tests/test_distributed.py, as one process of a (possibly) multi-process run.

    JAX_COORDINATOR_ADDRESS=... JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i \
    python tests/distributed_run.py OUT_DIR LOCAL_DEVICES
Process 0 writes OUT_DIR.json with the loss of every healing step and the members' perplexities; each process
prints one line inside `main_process_output()`, so only process 0's reaches stdout.
"""
import os
import sys

os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={sys.argv[2]}"
sys.path.insert(0, os.path.dirname(__file__))

from plrd_jax.data.windows import ProcessLocalData  # noqa: E402
from plrd_jax.training.distributed import initialize, is_main_process, main_process_output

INFO = initialize()  # before anything touches a device

import dataclasses  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402

from family_run import CONFIG, SCHEDULE, tiny_data  # noqa: E402
from plrd_jax.methods.plrd import run_family  # noqa: E402
from plrd_jax.nn.model import init_params  # noqa: E402
from plrd_jax.nn.sharding import batch_sharding, make_mesh  # noqa: E402
from plrd_jax.io.store import FamilyStore  # noqa: E402

MESH_SHAPE = (1, -1, 1)  # every device of every process on the fsdp axis: batch and params split over hosts
STAGES = tuple(dataclasses.replace(s, heal_tokens=4 * SCHEDULE.batch_size * SCHEDULE.seq_len) for s in SCHEDULE.stages)


def main(out):
    heal, evals = tiny_data()
    heal = ProcessLocalData(heal, batch_sharding(make_mesh(MESH_SHAPE)))
    losses = []

    def on_event(kind, info):
        if kind == "step":
            losses.append(info["loss"])

    store = FamilyStore(out)
    results = run_family("tiny", CONFIG, init_params(CONFIG, seed=0), dataclasses.replace(SCHEDULE, stages=STAGES),
                         heal, evals, store, mesh_shape=MESH_SHAPE, save_every=2, on_event=on_event)
    store.close()
    if is_main_process():
        with open(f"{out}.json", "w") as f:
            json.dump({"losses": losses, "ppl_after": [r.ppl_after["eval"] for r in results],
                       "devices": jax.device_count(), "processes": jax.process_count()}, f)
    with main_process_output():
        print(f"process {INFO.process_id} of {INFO.num_processes} finished", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
