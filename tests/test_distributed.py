import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from family_run import SCHEDULE

from plrd_jax.data.windows import ProcessLocalData
from plrd_jax.training.distributed import DistributedError, process_info_from_env, process_rows
from plrd_jax.nn.sharding import batch_sharding, make_mesh

HERE = os.path.dirname(__file__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(out, processes, local_devices):
    """`processes` copies of distributed_run.py joined through a localhost coordinator; their stdout (without
    the gloo library's own connection lines)."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE), JAX_PLATFORMS="cpu")
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(name, None)
    if processes > 1:
        env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{free_port()}", JAX_NUM_PROCESSES=str(processes))
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "distributed_run.py"), str(out), str(local_devices)],
                              env=dict(env, **({"JAX_PROCESS_ID": str(i)} if processes > 1 else {})),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(processes)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    return ["".join(line for line in o.splitlines(True) if not line.startswith("[Gloo]")) for o, _ in outputs]


def members(directory):
    from plrd_jax.io.store import FamilyStore, load_member
    from plrd_jax.transforms.factorize import densify

    out = []
    for m in FamilyStore(directory, read_only=True).members():
        config, params, meta = load_member(f"{directory}:{m['member']}")
        # Factors are defined up to A D, D⁻¹ B (SVD signs depend on how the QR/SVD was partitioned): compare A B.
        out.append((meta["params"], config, densify(params, config)[0]))
    return out


@pytest.mark.slow  # three processes compile and heal a two-member family: ~100 s of CPU
def test_two_processes_give_the_loss_curve_and_members_of_one_process(tmp_path):
    one = launch(tmp_path / "one", processes=1, local_devices=4)
    two = launch(tmp_path / "two", processes=2, local_devices=2)
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (a["devices"], a["processes"], b["devices"], b["processes"]) == (4, 1, 4, 2)
    assert len(a["losses"]) == 8
    np.testing.assert_allclose(b["losses"], a["losses"], rtol=1e-5)
    np.testing.assert_allclose(b["ppl_after"], a["ppl_after"], rtol=1e-5)
    # logs from process 0 only
    assert one == ["process 0 of 1 finished\n"]
    assert two == ["process 0 of 2 finished\n", ""]
    # Same members: every (densified) parameter within 1% of one Adam step (the schedule's lr) of the
    # single-process one; the two runs differ only in the order of floating-point reductions across processes.
    lr = SCHEDULE.heal.lr
    for (count_a, config_a, params_a), (count_b, config_b, params_b) in zip(members(tmp_path / "one"),
                                                                            members(tmp_path / "two"), strict=True):
        assert count_a == count_b and config_a == config_b
        for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(params_a), jax.tree.leaves(params_b)):
            x, y = np.asarray(x), np.asarray(y)
            assert np.abs(x - y).max() <= 0.01 * lr, jax.tree_util.keystr(path)


def test_environment_errors_are_one_clear_line():
    assert process_info_from_env({}) is None
    info = process_info_from_env({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:8476", "JAX_NUM_PROCESSES": "4",
                                  "JAX_PROCESS_ID": "3"})
    assert (info.process_id, info.num_processes, info.coordinator) == (3, 4, "10.0.0.2:8476")
    with pytest.raises(DistributedError, match="JAX_NUM_PROCESSES, JAX_PROCESS_ID not"):
        process_info_from_env({"JAX_COORDINATOR_ADDRESS": "h:1"})
    with pytest.raises(DistributedError, match=r"JAX_PROCESS_ID=4 must lie in \[0, JAX_NUM_PROCESSES=4\)"):
        process_info_from_env({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "4"})
    with pytest.raises(DistributedError, match="is not host:port"):
        process_info_from_env({"JAX_COORDINATOR_ADDRESS": "h", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"})


def test_process_local_batches_equal_the_datasets_batches_in_one_process():
    from plrd_jax.data.windows import TokenDataset

    windows = np.arange(40 * 8, dtype=np.int32).reshape(40, 8)
    data = ProcessLocalData(TokenDataset(windows, {"source": "synthetic"}), batch_sharding(make_mesh()))
    assert process_rows(data.sharding, (6, 8)) == slice(0, 6)
    for step in range(3):
        np.testing.assert_array_equal(np.asarray(data.batch_at(step, 6, seed=1)),
                                      data.dataset.batch_at(step, 6, seed=1))
