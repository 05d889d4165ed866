"""Launchers: dry-runs print exactly what runs; generated commands/scripts really work.

The cluster tools (gcloud, sbatch, srun, scontrol) are replaced by small fakes on PATH that
record their arguments and run what a real cluster would run (the remote ``--command``
through bash; every srun task with its SLURM_* variables), so quoting and the multi-host
environment are exercised for real, down to ``jax.distributed`` over localhost.
"""

import io
import json
import os
import shlex
import socket
import stat
import subprocess
import sys
import textwrap

from peft_jax.launchers import SlurmOptions, TpuOptions, launch_main, slurm_script, tpu_commands

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dry(argv):
    buf = io.StringIO()
    assert launch_main(argv, out=buf) == 0
    return buf.getvalue()


def _write_exe(path, text):
    path.write_text(textwrap.dedent(text))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_tpu_dry_run_prints_expected_commands():
    out = _dry(["tpu", "--name", "pod-32", "--zone", "us-central2-b", "--project", "proj", "--dry-run",
                "--", "train", "--config", "configs/main_sst2.py", "--config.train.steps=100"])
    lines = out.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("gcloud compute tpus tpu-vm ssh pod-32 --zone us-central2-b --project proj "
                               "--worker=all --command 'cd peft_jax && (test -x .venv/bin/python || "
                               "python3 -m venv .venv) && .venv/bin/python -m pip install -q -e . ")
    assert "jax[tpu]==" in lines[0]
    assert lines[1] == (
        "gcloud compute tpus tpu-vm ssh pod-32 --zone us-central2-b --project proj --worker=all --command "
        "'cd peft_jax && . .venv/bin/activate && export PEFT_JAX_DISTRIBUTED=auto HF_HUB_OFFLINE=1 "
        "TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false && python -m peft_jax.cli train --config "
        "configs/main_sst2.py --config.train.steps=100'")
    out = _dry(["tpu", "--name", "p", "--zone", "z", "--no-setup", "--detach", "--env", "A=b c",
                "--ssh-arg=--tunnel-through-iap",
                "--git-url", "https://x/y.git", "--dry-run", "--", "sweep", "--config", "c.py"])
    (line,) = out.strip().splitlines()
    remote = shlex.split(line)[-1]
    assert shlex.split(line)[-4:-1] == ["--worker=all", "--tunnel-through-iap", "--command"]
    assert "A='b c'" in remote and "nohup python -m peft_jax.cli sweep --config c.py > " \
        "logs/tpu-$(hostname).log 2>&1 < /dev/null &" in remote


def test_tpu_with_git_setup():
    o = TpuOptions(name="p", zone="z", git_url="https://h/r.git", git_ref="v1")
    setup = shlex.split(shlex.join(tpu_commands(o, ["train"])[0]))[-1]
    assert setup.startswith("(test -d peft_jax/.git || git clone https://h/r.git peft_jax) && "
                            "git -C peft_jax fetch --all --quiet && git -C peft_jax checkout --quiet v1 && "
                            "cd peft_jax && (test -x .venv/bin/python")


def test_launch_errors(capsys):
    assert launch_main(["tpu", "--name", "p", "--zone", "z", "--dry-run"]) == 2
    assert "nothing to run" in capsys.readouterr().err
    assert launch_main(["slurm", "--nodes", "0", "--gpus-per-node", "8", "--dry-run", "--", "train"]) == 2
    assert "--nodes must be >= 1" in capsys.readouterr().err
    assert launch_main(["tpu", "--name", "p", "--zone", "z", "--env", "oops", "--", "train"]) == 2
    assert "--env 'oops'" in capsys.readouterr().err


def test_tpu_execution_matches_dry_run(tmp_path, monkeypatch):
    """A fake gcloud records argv and runs the --command through bash in a fake host home."""
    bin_dir, home = tmp_path / "bin", tmp_path / "home"
    (home / "peft_jax" / ".venv" / "bin").mkdir(parents=True)
    (home / "peft_jax" / ".venv" / "bin" / "activate").write_text("export FAKE_VENV=1\n")
    bin_dir.mkdir()
    _write_exe(bin_dir / "gcloud", f'''\
        #!{sys.executable}
        import json, subprocess, sys
        with open({str(tmp_path / "gcloud.log")!r}, "a") as f:
            f.write(json.dumps(sys.argv[1:]) + "\\n")
        cmd = sys.argv[sys.argv.index("--command") + 1]
        sys.exit(subprocess.call(["bash", "-c", cmd], cwd={str(home)!r}))
    ''')
    _write_exe(tmp_path / "job.py", '''\
        import json, os, sys
        keys = ["PEFT_JAX_DISTRIBUTED", "HF_HUB_OFFLINE", "FAKE_VENV", "EXTRA"]
        with open("job.json", "w") as f:
            json.dump({"argv": sys.argv[1:], "env": {k: os.environ.get(k) for k in keys}}, f)
    ''')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    opts = ["tpu", "--name", "pod", "--zone", "z", "--no-setup", "--env", "EXTRA=x y",
            "--program", f"{sys.executable} {tmp_path / 'job.py'}"]
    job_args = ["--", "train", "--config", "c.py", "--config.task.name=it's here", "--workdir", "/w d"]
    printed = [shlex.split(line) for line in _dry(opts + ["--dry-run"] + job_args).strip().splitlines()]
    assert not (tmp_path / "gcloud.log").exists()
    assert launch_main(opts + job_args, out=io.StringIO()) == 0
    called = [json.loads(line) for line in (tmp_path / "gcloud.log").read_text().splitlines()]
    assert [["gcloud"] + c for c in called] == printed
    job = json.loads((home / "peft_jax" / "job.json").read_text())
    assert job["argv"] == ["train", "--config", "c.py", "--config.task.name=it's here", "--workdir", "/w d"]
    assert job["env"] == {"PEFT_JAX_DISTRIBUTED": "auto", "HF_HUB_OFFLINE": "1", "FAKE_VENV": "1",
                          "EXTRA": "x y"}


def test_slurm_script_contents():
    o = SlurmOptions(nodes=2, gpus_per_node=8, partition="gpu", account="acct", cpus_per_task=12,
                     repo_dir="/repo", log_dir="/repo/logs", setup=("module load cuda/12.4",),
                     sbatch=("--qos=high",))
    s = slurm_script(o, ["train", "--config", "c.py"])
    lines = s.splitlines()
    assert lines[0] == "#!/bin/bash"
    for opt in ["--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=12",
                "--partition=gpu", "--account=acct", "--qos=high", "--output=/repo/logs/%x-%j.out"]:
        assert f"#SBATCH {opt}" in lines
    assert "module load cuda/12.4" in lines and "cd /repo" in lines
    assert lines[-1] == ("srun --kill-on-bad-exit=1 bash -c 'export PEFT_JAX_PROCESS_ID=\"$SLURM_PROCID\"; "
                         "export CUDA_VISIBLE_DEVICES=\"$SLURM_LOCALID\"; exec python -m peft_jax.cli train "
                         "--config c.py'")
    per_node = slurm_script(SlurmOptions(nodes=4, gpus_per_node=8, per="node"), ["train"])
    assert "#SBATCH --ntasks-per-node=1" in per_node and "CUDA_VISIBLE_DEVICES" not in per_node


def _fake_slurm(tmp_path, nodes, tasks_per_node):
    """Fake sbatch (records the script path and runs it as the job), srun, scontrol."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _write_exe(bin_dir / "scontrol", '''\
        #!/bin/bash
        [ "$1 $2" = "show hostnames" ] || exit 3
        echo localhost; echo node-b; echo node-c
    ''')
    _write_exe(bin_dir / "srun", f'''\
        #!/bin/bash
        # runs "$@" once per task, all at once, like srun inside an allocation
        shift  # --kill-on-bad-exit=1
        pids=()
        for ((i = 0; i < SLURM_NTASKS; i++)); do
          SLURM_PROCID=$i SLURM_LOCALID=$((i % {tasks_per_node})) "$@" & pids+=($!)
        done
        rc=0; for p in "${{pids[@]}}"; do wait "$p" || rc=$?; done; exit $rc
    ''')
    _write_exe(bin_dir / "sbatch", f'''\
        #!/bin/bash
        echo "$@" >> {tmp_path / "sbatch.log"}
        SLURM_JOB_NODELIST="localhost,node-b" SLURM_NTASKS={nodes * tasks_per_node} bash "$1"
    ''')
    return bin_dir


def test_slurm_dry_run_text_is_what_runs(tmp_path, monkeypatch):
    """The printed dry-run text, run by bash, writes the same script and submits it; the script
    gives every task the coordinator, process count, its process id and its GPU."""
    bin_dir = _fake_slurm(tmp_path, nodes=2, tasks_per_node=2)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    _write_exe(tmp_path / "job.py", '''\
        import json, os
        keys = ["PEFT_JAX_COORDINATOR", "PEFT_JAX_NUM_PROCESSES", "PEFT_JAX_PROCESS_ID", "CUDA_VISIBLE_DEVICES"]
        with open(f"task{os.environ['PEFT_JAX_PROCESS_ID']}.json", "w") as f:
            json.dump({k: os.environ.get(k) for k in keys}, f)
    ''')
    script = tmp_path / "s" / "job.sbatch"
    argv = ["slurm", "--nodes", "2", "--gpus-per-node", "2", "--repo-dir", str(tmp_path), "--venv", "",
            "--port", "1234", "--script", str(script), "--program", f"{sys.executable} job.py",
            "--dry-run", "--", "train", "--config", "c.py"]
    text = _dry(argv)
    assert text.splitlines()[-1] == f"sbatch {script}" and not script.exists()
    subprocess.run(["bash", "-c", text], check=True)
    assert (tmp_path / "sbatch.log").read_text().split() == [str(script)]
    o = SlurmOptions(nodes=2, gpus_per_node=2, repo_dir=str(tmp_path), venv=None, port=1234,
                     log_dir=os.path.join(str(tmp_path), "slurm_logs"), program=f"{sys.executable} job.py")
    assert script.read_text() == slurm_script(o, ["train", "--config", "c.py"])
    tasks = [json.loads((tmp_path / f"task{i}.json").read_text()) for i in range(4)]
    assert tasks == [{"PEFT_JAX_COORDINATOR": "localhost:1234", "PEFT_JAX_NUM_PROCESSES": "4",
                      "PEFT_JAX_PROCESS_ID": str(i), "CUDA_VISIBLE_DEVICES": str(i % 2)} for i in range(4)]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_slurm_script_initializes_jax_distributed(tmp_path, monkeypatch):
    """Real run: the generated sbatch script starts 2 processes that form one jax.distributed job."""
    bin_dir = _fake_slurm(tmp_path, nodes=2, tasks_per_node=1)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    _write_exe(tmp_path / "job.py", f'''\
        import json, os, sys
        sys.path.insert(0, {ROOT!r})
        from peft_jax.parallel.distributed import initialize
        initialize()
        import jax
        with open(f"proc{{jax.process_index()}}.json", "w") as f:
            json.dump(dict(count=jax.process_count(), devices=jax.device_count(),
                           local=jax.local_device_count()), f)
    ''')
    rc = launch_main(["slurm", "--nodes", "2", "--gpus-per-node", "1", "--per", "node",
                      "--repo-dir", str(tmp_path), "--venv", "", "--port", str(_free_port()),
                      "--env", "JAX_PLATFORMS=cpu", "--env", "XLA_FLAGS=--xla_force_host_platform_device_count=2",
                      "--program", f"{sys.executable} job.py", "--", "train"], out=io.StringIO())
    assert rc == 0
    procs = [json.loads((tmp_path / f"proc{i}.json").read_text()) for i in range(2)]
    assert procs == [dict(count=2, devices=4, local=2)] * 2
