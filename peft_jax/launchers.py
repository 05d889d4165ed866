"""Launchers for multi-host runs: TPU VM pod slices (gcloud) and SLURM GPU clusters (sbatch).

The same program runs on every host; ``peft_jax.parallel.distributed.initialize`` reads

- TPU pods: ``PEFT_JAX_DISTRIBUTED=auto`` (JAX discovers the slice from the TPU metadata);
- SLURM: ``PEFT_JAX_COORDINATOR`` (first node of the allocation : port),
  ``PEFT_JAX_NUM_PROCESSES`` (= ``$SLURM_NTASKS``) and ``PEFT_JAX_PROCESS_ID``
  (= ``$SLURM_PROCID``), one process per GPU (``CUDA_VISIBLE_DEVICES=$SLURM_LOCALID``) or
  one per node (each seeing all of its node's GPUs).

Everything after ``--`` is the ``peft-jax`` command to run on the hosts (``train --config
... --config.a.b=v``, ``sweep ...``). ``--dry-run`` prints exactly what would be executed,
as shell text that can itself be run: one ``gcloud`` command a line for TPU; for SLURM a
``cat > SCRIPT <<'EOF' ... EOF`` here-document followed by ``sbatch SCRIPT``.

    peft-jax launch tpu --name my-v4-32 --zone us-central2-b [--project P]
        [--git-url URL [--git-ref REF]] [--no-setup] [--detach] [--dry-run] -- train --config ...
    peft-jax launch slurm --nodes 2 --gpus-per-node 8 [--per gpu|node] [--partition P]
        [--time 24:00:00] [--dry-run] -- train --config ...
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
from importlib import metadata
from typing import Optional, Sequence, TextIO

from peft_jax import compile_cache
from peft_jax.errors import print_error

OFFLINE_ENV = (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"))
DEFAULT_PROGRAM = "python -m peft_jax.cli"


class LaunchError(ValueError):
    """Bad launcher arguments; the message names the option."""


def _jax_version() -> str:
    try:
        return metadata.version("jax")
    except metadata.PackageNotFoundError:
        return "0.10.2"


def _env_assignments(env: Sequence[tuple[str, str]]) -> str:
    return " ".join(f"{k}={shlex.quote(v)}" for k, v in env)


def parse_env(items: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for it in items:
        k, sep, v = it.partition("=")
        if not sep or not k.isidentifier():
            raise LaunchError(f"--env {it!r}: expected NAME=VALUE")
        out.append((k, v))
    return out


# ----------------------------------------------------------------------------- TPU


@dataclasses.dataclass(frozen=True)
class TpuOptions:
    name: str
    zone: str
    project: Optional[str] = None
    repo_dir: str = "peft_jax"          # on the TPU hosts, relative to the login home
    git_url: Optional[str] = None
    git_ref: Optional[str] = None
    setup: bool = True
    extra_setup: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    program: str = DEFAULT_PROGRAM
    detach: bool = False
    ssh_args: tuple[str, ...] = ()     # extra gcloud ssh flags, e.g. --tunnel-through-iap
    log: str = "logs/tpu-$(hostname).log"  # used with detach; relative to repo_dir


def _gcloud_ssh(o: TpuOptions, command: str) -> list[str]:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", o.name, "--zone", o.zone]
    if o.project:
        cmd += ["--project", o.project]
    return cmd + ["--worker=all", *o.ssh_args, "--command", command]


def tpu_setup_command(o: TpuOptions) -> str:
    """Shell text run on every TPU host before the job: code, venv, TPU jax."""
    d = shlex.quote(o.repo_dir)
    steps = []
    if o.git_url:
        steps.append(f"(test -d {d}/.git || git clone {shlex.quote(o.git_url)} {d})")
        if o.git_ref:
            steps.append(f"git -C {d} fetch --all --quiet && git -C {d} checkout --quiet {shlex.quote(o.git_ref)}")
    steps.append(f"cd {d}")
    # core package + TPU runtime only (launch/setup_env.sh would add the CPU torch reference stack)
    steps.append("(test -x .venv/bin/python || python3 -m venv .venv)")
    steps.append(f".venv/bin/python -m pip install -q -e . {shlex.quote(f'jax[tpu]=={_jax_version()}')}")
    steps += list(o.extra_setup)
    return " && ".join(steps)


def tpu_run_command(o: TpuOptions, peft_args: Sequence[str]) -> str:
    """Shell text run on every TPU host: the peft-jax command with the multi-host env."""
    env = [("PEFT_JAX_DISTRIBUTED", "auto"), *OFFLINE_ENV, *o.env]
    job = f"{o.program} {shlex.join(peft_args)}"
    head = f"cd {shlex.quote(o.repo_dir)} && . .venv/bin/activate && export {_env_assignments(env)}"
    if o.detach:
        log_dir = os.path.dirname(o.log) or "."
        return (f"{head} && mkdir -p {log_dir} && nohup {job} > {o.log} 2>&1 < /dev/null &")
    return f"{head} && {job}"


def tpu_commands(o: TpuOptions, peft_args: Sequence[str]) -> list[list[str]]:
    """argv lists, in order: setup on all workers (unless disabled), then the run on all workers."""
    if not peft_args:
        raise LaunchError("nothing to run: give the peft-jax command after --, e.g. -- train --config F.py")
    cmds = []
    if o.setup:
        cmds.append(_gcloud_ssh(o, tpu_setup_command(o)))
    cmds.append(_gcloud_ssh(o, tpu_run_command(o, peft_args)))
    return cmds


# ----------------------------------------------------------------------------- SLURM


@dataclasses.dataclass(frozen=True)
class SlurmOptions:
    nodes: int
    gpus_per_node: int
    per: str = "gpu"                    # "gpu": one process per GPU; "node": one per node
    job_name: str = "peft-jax"
    partition: Optional[str] = None
    account: Optional[str] = None
    time: str = "24:00:00"
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None
    port: int = 29500
    repo_dir: str = "."
    venv: Optional[str] = ".venv"
    log_dir: str = "slurm_logs"
    setup: tuple[str, ...] = ()          # extra shell lines (module load ..., exports)
    sbatch: tuple[str, ...] = ()         # extra #SBATCH options, e.g. "--qos=high"
    env: tuple[tuple[str, str], ...] = ()
    program: str = DEFAULT_PROGRAM

    def validate(self) -> None:
        if self.per not in ("gpu", "node"):
            raise LaunchError(f"--per {self.per!r}: choose gpu or node")
        if self.nodes < 1:
            raise LaunchError(f"--nodes must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 1:
            raise LaunchError(f"--gpus-per-node must be >= 1, got {self.gpus_per_node}")
        if not 0 < self.port < 65536:
            raise LaunchError(f"--port {self.port} is not a TCP port")

    @property
    def tasks_per_node(self) -> int:
        return self.gpus_per_node if self.per == "gpu" else 1


def slurm_script(o: SlurmOptions, peft_args: Sequence[str]) -> str:
    """The sbatch script text (bash) running ``peft_args`` on every task of the allocation."""
    o.validate()
    if not peft_args:
        raise LaunchError("nothing to run: give the peft-jax command after --, e.g. -- train --config F.py")
    cpus = o.cpus_per_task
    sb = [f"--job-name={o.job_name}", f"--nodes={o.nodes}", f"--ntasks-per-node={o.tasks_per_node}",
          f"--gpus-per-node={o.gpus_per_node}", f"--time={o.time}",
          f"--output={os.path.join(o.log_dir, '%x-%j.out')}"]
    if cpus:
        sb.append(f"--cpus-per-task={cpus}")
    if o.mem:
        sb.append(f"--mem={o.mem}")
    if o.partition:
        sb.append(f"--partition={o.partition}")
    if o.account:
        sb.append(f"--account={o.account}")
    sb += list(o.sbatch)
    per_task = ['export PEFT_JAX_PROCESS_ID="$SLURM_PROCID"']
    if o.per == "gpu":
        per_task.append('export CUDA_VISIBLE_DEVICES="$SLURM_LOCALID"')
    per_task.append(f"exec {o.program} {shlex.join(peft_args)}")
    lines = ["#!/bin/bash", *(f"#SBATCH {s}" for s in sb),
             f"# generated by peft_jax.launchers: {o.nodes} node(s) x {o.tasks_per_node} process(es)",
             "set -euo pipefail",
             f"cd {shlex.quote(o.repo_dir)}"]
    if o.venv:
        lines.append(f"source {shlex.quote(os.path.join(o.venv, 'bin', 'activate'))}")
    lines += list(o.setup)
    # sed reads all of its input (head would exit early: SIGPIPE, fatal under pipefail)
    lines += ['PEFT_JAX_COORDINATOR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)'
              f':{o.port}"',
              "export PEFT_JAX_COORDINATOR",
              'export PEFT_JAX_NUM_PROCESSES="$SLURM_NTASKS"']
    env = [*OFFLINE_ENV, *o.env]
    lines.append(f"export {_env_assignments(env)}")
    lines.append(f"srun --kill-on-bad-exit=1 bash -c {shlex.quote('; '.join(per_task))}")
    return "\n".join(lines) + "\n"


def slurm_dry_run_text(script: str, path: str) -> str:
    """Runnable shell text: write the script (here-document), then submit it."""
    q = shlex.quote(path)
    return f"mkdir -p {shlex.quote(os.path.dirname(path) or '.')}\ncat > {q} <<'PEFT_JAX_EOF'\n{script}" \
           f"PEFT_JAX_EOF\nsbatch {q}\n"


# ----------------------------------------------------------------------------- main


def _execute(cmds: Sequence[Sequence[str]], out: TextIO) -> int:
    for cmd in cmds:
        print(f"+ {shlex.join(cmd)}", file=out, flush=True)
        rc = subprocess.call(list(cmd), env=compile_cache.child_environ())
        if rc != 0:
            print(f"launch: command failed with exit code {rc}", file=sys.stderr)
            return rc
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peft-jax launch", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="target", required=True)
    t = sub.add_parser("tpu", help="TPU VM pod slice through gcloud ssh --worker=all")
    t.add_argument("--name", required=True)
    t.add_argument("--zone", required=True)
    t.add_argument("--project")
    t.add_argument("--repo-dir", default="peft_jax", help="checkout on the hosts (relative to home)")
    t.add_argument("--git-url")
    t.add_argument("--git-ref")
    t.add_argument("--no-setup", action="store_true", help="skip the setup step")
    t.add_argument("--setup", action="append", default=[], help="extra setup shell step (repeatable)")
    t.add_argument("--env", action="append", default=[], help="NAME=VALUE for the job (repeatable)")
    t.add_argument("--program", default=DEFAULT_PROGRAM)
    t.add_argument("--detach", action="store_true", help="nohup the job; logs under repo_dir/logs/")
    t.add_argument("--ssh-arg", action="append", default=[], help="extra gcloud ssh flag (repeatable)")
    t.add_argument("--dry-run", action="store_true")
    s = sub.add_parser("slurm", help="multi-node GPU job through sbatch + srun")
    s.add_argument("--nodes", type=int, required=True)
    s.add_argument("--gpus-per-node", type=int, required=True)
    s.add_argument("--per", default="gpu", choices=["gpu", "node"])
    s.add_argument("--job-name", default="peft-jax")
    s.add_argument("--partition")
    s.add_argument("--account")
    s.add_argument("--time", default="24:00:00")
    s.add_argument("--cpus-per-task", type=int)
    s.add_argument("--mem")
    s.add_argument("--port", type=int, default=29500)
    s.add_argument("--repo-dir", default=None, help="default: the current directory")
    s.add_argument("--venv", default=".venv", help="'' to not activate one")
    s.add_argument("--log-dir", default="slurm_logs")
    s.add_argument("--setup", action="append", default=[], help="extra shell line (repeatable)")
    s.add_argument("--sbatch", action="append", default=[], help="extra #SBATCH option (repeatable)")
    s.add_argument("--env", action="append", default=[])
    s.add_argument("--program", default=DEFAULT_PROGRAM)
    s.add_argument("--script", default=None, help="where to write the script (default LOG_DIR/JOB.sbatch)")
    s.add_argument("--dry-run", action="store_true")
    return p


def launch_main(argv: Optional[Sequence[str]] = None, out: Optional[TextIO] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    out = out or sys.stdout
    if "--" in argv:
        i = argv.index("--")
        argv, peft_args = argv[:i], argv[i + 1:]
    else:
        peft_args = []
    a = build_parser().parse_args(argv)
    try:
        env = tuple(parse_env(a.env))
        if a.target == "tpu":
            o = TpuOptions(name=a.name, zone=a.zone, project=a.project, repo_dir=a.repo_dir,
                           git_url=a.git_url, git_ref=a.git_ref, setup=not a.no_setup,
                           extra_setup=tuple(a.setup), env=env, program=a.program, detach=a.detach,
                           ssh_args=tuple(a.ssh_arg))
            cmds = tpu_commands(o, peft_args)
            if a.dry_run:
                for c in cmds:
                    print(shlex.join(c), file=out)
                return 0
            return _execute(cmds, out)
        repo = os.path.abspath(a.repo_dir or os.getcwd())
        log_dir = a.log_dir if os.path.isabs(a.log_dir) else os.path.join(repo, a.log_dir)
        o = SlurmOptions(nodes=a.nodes, gpus_per_node=a.gpus_per_node, per=a.per, job_name=a.job_name,
                         partition=a.partition, account=a.account, time=a.time,
                         cpus_per_task=a.cpus_per_task, mem=a.mem, port=a.port, repo_dir=repo,
                         venv=a.venv or None, log_dir=log_dir, setup=tuple(a.setup),
                         sbatch=tuple(a.sbatch), env=env, program=a.program)
        script = slurm_script(o, peft_args)
        path = os.path.abspath(a.script or os.path.join(log_dir, f"{a.job_name}.sbatch"))
        if a.dry_run:
            out.write(slurm_dry_run_text(script, path))
            return 0
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.makedirs(log_dir, exist_ok=True)
        with open(path, "w") as f:
            f.write(script)
        print(f"wrote {path}", file=out)
        return _execute([["sbatch", path]], out)
    except LaunchError as e:
        print_error(e, f"launch {a.target}: ")
        return 2


if __name__ == "__main__":
    sys.exit(launch_main())
