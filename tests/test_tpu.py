"""tpu/tpu.py: the exact gcloud commands of every subcommand's dry run, its checks, and its remote scripts run
locally in bash (a fake HOME standing in for a worker)."""
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tpu"))

import tpu  # noqa: E402


def dry(*argv):
    """(exit code, command lines without comments, stderr) of `tpu/tpu.py ... --dry-run` in a subprocess."""
    r = subprocess.run([sys.executable, str(ROOT / "tpu" / "tpu.py"), argv[0], "--dry-run", *argv[1:]], capture_output=True,
                       text=True, timeout=60)
    return r.returncode, [ln for ln in r.stdout.splitlines() if not ln.startswith("#")], r.stderr


def test_create_on_demand_spot_and_queued():
    assert dry("create", "--name", "plrd-a", "--zone", "us-central2-b", "--accelerator", "v4-32")[1] == [
        "gcloud compute tpus tpu-vm create plrd-a --zone=us-central2-b --accelerator-type=v4-32 "
        "--version=tpu-ubuntu2204-base"]
    assert dry("create", "--name", "b", "--zone", "europe-west4-a", "--accelerator", "v6e-8", "--spot")[1] == [
        "gcloud compute tpus tpu-vm create b --zone=europe-west4-a --accelerator-type=v6e-8 "
        "--version=v2-alpha-tpuv6e --spot"]
    assert dry("create", "--name", "c", "--zone", "us-east5-a", "--accelerator", "v5p-128", "--queued", "--spot",
               "--valid-until", "6h", "--project", "p1")[1] == [
        "gcloud compute tpus queued-resources create c --node-id=c --zone=us-east5-a --accelerator-type=v5p-128 "
        "--runtime-version=v2-alpha-tpuv5 --spot --valid-until-duration=6h --project=p1"]
    assert dry("create", "--name", "d", "--zone", "us-west4-a", "--accelerator", "v5litepod-16", "--queued")[1] == [
        "gcloud compute tpus queued-resources create d --node-id=d --zone=us-west4-a "
        "--accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite"]


def test_delete_setup_logs_status():
    assert dry("delete", "--name", "a", "--zone", "us-central2-b")[1] == [
        "gcloud compute tpus tpu-vm delete a --zone=us-central2-b --quiet"]
    assert dry("delete", "--name", "a", "--zone", "us-central2-b", "--queued")[1] == [
        "gcloud compute tpus queued-resources delete a --zone=us-central2-b --force --quiet"]
    code, lines, _ = dry("setup", "--name", "a", "--zone", "us-central2-b")
    assert code == 0 and len(lines) == 3
    assert lines[0] == f"git -C {ROOT} archive --format=tar.gz -o /tmp/plrd-a.tar.gz HEAD"
    assert lines[1] == "gcloud compute tpus tpu-vm scp /tmp/plrd-a.tar.gz a:plrd.tar.gz --zone=us-central2-b --worker=all"
    argv = shlex.split(lines[2])
    assert argv[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "a", "--zone=us-central2-b"]
    assert argv[7] == "--worker=all" and argv[8] == "--command=" + tpu.setup_script("python3.11")
    assert "pip install -q -e .; pip install -q -U 'jax[tpu]'" in argv[8]
    assert dry("logs", "--name", "a", "--zone", "us-central2-b", "--run", "r1", "--follow")[1] == [
        "gcloud compute tpus tpu-vm ssh a --zone=us-central2-b --worker=0 "
        "'--command=tail -n 100 -F $HOME/runs/r1/worker.log'"]
    code, lines, _ = dry("status", "--name", "a", "--zone", "us-central2-b", "--run", "r1")
    assert lines[0] == "gcloud compute tpus tpu-vm describe a --zone=us-central2-b" and "--worker=all" in lines[1]


def test_mount_checks_the_bucket_then_mounts_it_on_every_worker():
    code, lines, _ = dry("mount", "--name", "a", "--zone", "us-central2-b", "--bucket", "gs://store-b")
    assert code == 0 and lines[0] == "gcloud storage buckets describe gs://store-b '--format=value(name)'"
    argv = shlex.split(lines[1])
    assert argv[7:] == ["--worker=all", "--command=" + tpu.mount_script("store-b", "$HOME/gcs/store-b")]
    assert subprocess.run(["bash", "-n", "-c", tpu.mount_script("store-b", "/mnt/b")]).returncode == 0


def test_launch_checks_every_bucket_then_starts_all_workers():
    code, lines, _ = dry("launch", "--name", "a", "--zone", "us-central2-b", "--run", "fam1",
                         "--env", "TFDS_DATA_DIR=gs://data-b/tfds", "--", "python", "-m", "plrd_jax", "family",
                         "--out", "gs://store-b/fam", "--data-dir=gs://data-b/tfds")
    assert code == 0
    out = subprocess.run([sys.executable, str(ROOT / "tpu" / "tpu.py"), "launch", "--dry-run", "--name", "a", "--zone",
                          "us-central2-b", "--run", "r", "--", "ls", "gs://store-b/x"], capture_output=True, text=True).stdout
    assert out.startswith("# gs://store-b: well-formed; that it exists is checked at run time\n")
    assert lines[:2] == ["gcloud storage buckets describe gs://store-b '--format=value(name)'",
                         "gcloud storage buckets describe gs://data-b '--format=value(name)'"]
    argv = shlex.split(lines[2])
    assert argv[4:8] == ["ssh", "a", "--zone=us-central2-b", "--worker=all"]
    command = ["python", "-m", "plrd_jax", "family", "--out", "gs://store-b/fam", "--data-dir=gs://data-b/tfds"]
    assert argv[8] == "--command=" + tpu.launch_script("fam1", command, ["TFDS_DATA_DIR=gs://data-b/tfds"])


def test_collect_copies_one_log_per_host_and_the_results():
    code, lines, _ = dry("collect", "--name", "a", "--zone", "us-central2-b", "--accelerator", "v4-32", "--run", "r",
                         "--dest", "out", "--results", "gs://b-1/fam/summary.md", "--results", "runs/r/table.md")
    assert lines == [
        "mkdir -p out/r",
        "gcloud storage buckets describe gs://b-1 '--format=value(name)'",
        *[f"gcloud compute tpus tpu-vm scp a:runs/r/worker.log out/r/worker-{i}.log --zone=us-central2-b "
          f"--worker={i}" for i in range(4)],  # v4-32: 16 chips, 4 hosts
        "gcloud storage cp --recursive gs://b-1/fam/summary.md out/r/",
        "gcloud compute tpus tpu-vm scp --recurse a:runs/r/table.md out/r/ --zone=us-central2-b --worker=0"]


@pytest.mark.parametrize("argv, message", [
    (("create", "--name", "a", "--zone", "us-central9-z", "--accelerator", "v4-8"),
     "zone 'us-central9-z' offers no v4 TPUs; known zones: us-central2-b"),
    (("create", "--name", "a", "--zone", "us-central1-a", "--accelerator", "v6e-8"), "offers no v6e TPUs"),
    (("create", "--name", "a", "--zone", "nowhere", "--accelerator", "v4-8"), "is not a zone name"),
    (("create", "--name", "a", "--zone", "us-central2-b", "--accelerator", "v4-12"), "'v4-12' does not exist"),
    (("create", "--name", "a", "--zone", "us-central2-b", "--accelerator", "v5litepod-2"),
     "'v5litepod-2' does not exist"),
    (("create", "--name", "a", "--zone", "us-central2-b", "--accelerator", "v9-8"), "unknown accelerator type 'v9-8'"),
    (("create", "--name", "a", "--zone", "us-central2-b", "--accelerator", "v4-8", "--valid-until", "1h"),
     "--valid-until applies to queued resources only"),
    (("create", "--name", "My_TPU", "--zone", "us-central2-b", "--accelerator", "v4-8"), "TPU name 'My_TPU'"),
    (("delete", "--name", "a", "--zone", "mars-north1-a"), "zone 'mars-north1-a' offers no TPUs"),
    (("launch", "--name", "a", "--zone", "us-central2-b", "--run", "r", "--", "python", "x.py", "--out", "gs://A_B/x"),
     "bucket name 'A_B' is invalid"),
    (("launch", "--name", "a", "--zone", "us-central2-b", "--run", "r", "--", "python", "x.py", "--out", "gs://"),
     "bucket name '' is invalid"),
    (("launch", "--name", "a", "--zone", "us-central2-b", "--run", "r"), "launch needs the experiment after '--'"),
    (("launch", "--name", "a", "--zone", "us-central2-b", "--run", "a/b", "--", "ls"), "run name 'a/b'"),
    (("collect", "--name", "a", "--zone", "us-central2-b", "--accelerator", "v5p-9", "--run", "r"),
     "'v5p-9' does not exist"),
])
def test_bad_input_is_one_line_before_any_command(argv, message):
    code, lines, err = dry(*argv)
    assert code == 2 and lines == []
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_any_zone_accepts_a_zone_missing_from_the_table():
    code, lines, _ = dry("create", "--name", "a", "--zone", "us-central9-z", "--accelerator", "v4-8", "--any-zone")
    assert code == 0 and "--zone=us-central9-z" in lines[0]


def test_hosts_per_slice():
    assert [tpu.parse_accelerator(n).hosts for n in ("v4-8", "v4-16", "v4-32", "v5p-8", "v5p-256")] == [1, 2, 4, 1, 32]
    assert [tpu.parse_accelerator(n).hosts for n in ("v5litepod-1", "v5litepod-8", "v5litepod-16", "v6e-256")] == [
        1, 1, 4, 64]


def fake_gcloud(tmp_path, missing_bucket):
    """A `gcloud` that records its argv and fails `storage buckets describe` for `missing_bucket`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "gcloud"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/calls\n"
                      f"case \"$*\" in *\"describe gs://{missing_bucket} \"*) echo 'not found: 404' >&2; exit 1;; esac\n")
    script.chmod(0o755)
    return str(bin_dir)


def test_a_missing_bucket_stops_the_launch_before_any_worker_is_touched(tmp_path):
    env = dict(os.environ, PATH=fake_gcloud(tmp_path, "no-such-bucket") + os.pathsep + os.environ["PATH"])
    r = subprocess.run([sys.executable, str(ROOT / "tpu" / "tpu.py"), "launch", "--name", "a", "--zone",
                        "us-central2-b", "--run", "r", "--", "python", "-m", "plrd_jax", "family", "--out",
                        "gs://ok-bucket/fam", "--data-dir", "gs://no-such-bucket/tfds"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.splitlines()[-1].startswith(
        "error: GCS bucket gs://no-such-bucket does not exist or this account cannot read it")
    calls = (tmp_path / "calls").read_text().splitlines()
    assert [c.split()[:4] for c in calls] == [["storage", "buckets", "describe", "gs://ok-bucket"],
                                              ["storage", "buckets", "describe", "gs://no-such-bucket"]]


def test_without_gcloud_a_real_run_says_so(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path))
    r = subprocess.run([sys.executable, str(ROOT / "tpu" / "tpu.py"), "delete", "--name", "a", "--zone",
                        "us-central2-b"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: gcloud is not on PATH")


def test_launch_script_runs_detached_with_the_environment_and_records_the_exit_code(tmp_path):
    home = tmp_path / "home"
    (home / "plrd" / ".venv" / "bin").mkdir(parents=True)
    (home / "plrd" / ".venv" / "bin" / "activate").write_text("")
    command = [sys.executable, "-c", "import os; print('distributed=' + os.environ['PLRD_DISTRIBUTED'], "
                                     "os.environ['X'], os.getcwd())"]
    script = tpu.launch_script("r1", command, ["X=it's here"])
    env = dict(os.environ, HOME=str(home))
    assert subprocess.run(["bash", "-c", script], env=env, timeout=60).returncode == 0
    run_dir = home / "runs" / "r1"
    for _ in range(200):
        if (run_dir / "exit_code").exists():
            break
        time.sleep(0.05)
    assert (run_dir / "exit_code").read_text() == "0\n"
    assert (run_dir / "worker.log").read_text() == f"distributed=auto it's here {home / 'plrd'}\n"
    assert (run_dir / "command.txt").read_text() == shlex.join(command) + "\n"
    again = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "run r1 already exists" in again.stderr


def test_setup_script_is_valid_shell():
    assert subprocess.run(["bash", "-n", "-c", tpu.setup_script("python3.11")]).returncode == 0
