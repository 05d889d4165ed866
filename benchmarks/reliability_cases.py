"""Issue 13 ("Trustworthy runs"): every case of items 1-9 through the real ``peft-jax`` CLI,
as one markdown table: item | case | command | what the user sees | exit code | seconds.

    python benchmarks/reliability_cases.py [--cases 1,6,lr0,...] [--out FILE.md] [--keep DIR]

Everything is built in a temporary folder: one short finished run of all-MiniLM-L6-v2 + LoRA
on SST-2 (4 steps of 4 examples, checkpoints at 2 and 4; reused by the cases that need a
run, each on its own copy), a copy of it with every data file of its newest checkpoint
damaged, non-UTF-8 / empty task files, a NaN prompt ``.npy``, a delta and a copy of the
MiniLM HF folder each holding an extra 3.2 GB tensor that is a hole in a sparse file.
``--cases`` takes item numbers and/or case ids (``--list`` prints them). The exit-code column
marks a code other than the documented one, and the "what the user sees" column a
traceback, with a cross. Cases that need kill -9 at random moments, chaos or two live
processes are listed at the end with the tests that run them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "configs/minilm_lora_sst2.py"
# a short run: 4 steps of 4 examples, 32 train / 32 eval sentences, checkpoints at 2 and 4
SMALL = ["--config.train.steps=4", "--config.train.batch_size=4", "--config.task.max_train_examples=32",
         "--config.task.max_eval_examples=32", "--config.task.max_length=32",
         "--config.train.buckets=32,", "--config.train.ckpt_every=2", "--config.train.log_every=2",
         "--config.train.baseline=false", "--config.train.progress=false"]
ENV = {"JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
GB32 = 800_000_000   # float32 elements: 3.2 GB
NOISE = ("WARNING", "I0000", "W0000", "E0000", "[peft_jax] minilm:", "train:", "  warnings.warn")


@dataclasses.dataclass
class Case:
    item: int
    id: str
    label: str
    args: Callable[["Ctx"], list]   # CLI arguments (after ``peft-jax``)
    shown: str                     # the command as it is shown in the table
    code: int                      # the documented exit code
    show: str = ""                 # regex of the output lines worth showing ("" = error line / last)
    env: Optional[dict] = None
    after: Optional[Callable[["Ctx", subprocess.CompletedProcess], str]] = None  # extra check


class Ctx:
    """The temporary folder and what the cases share (built on first use)."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        self._run = None
        self._n = 0

    def cli(self, args, env=None, timeout=900):
        e = dict(os.environ, **ENV)
        for k in ("PEFT_JAX_FAULT", "PEFT_JAX_DEBUG", "XLA_FLAGS"):
            e.pop(k, None)
        e.update(env or {})
        return subprocess.run([sys.executable, "-m", "peft_jax.cli", *args], capture_output=True,
                              text=True, env=e, cwd=str(ROOT), timeout=timeout)

    def train(self, *extra, workdir=None):
        return ["train", "--config", CONFIG, *SMALL, *extra, "--workdir", workdir or self.new()]

    def new(self) -> str:
        """A workdir that does not exist yet."""
        self._n += 1
        return str(self.root / f"fresh{self._n}")

    @property
    def run(self) -> str:
        """The finished short run (trained once)."""
        if self._run is None:
            wd = str(self.root / "run")
            t0 = time.perf_counter()
            p = self.cli(self.train(workdir=wd))
            if p.returncode != 0:
                raise SystemExit(f"the short training run failed ({p.returncode}):\n{p.stderr[-3000:]}")
            print(f"[reliability_cases] trained the short run in {time.perf_counter() - t0:.0f}s "
                  f"({wd})", file=sys.stderr, flush=True)
            self._run = wd
        return self._run

    def copy(self, name: str) -> str:
        dst = str(self.root / name)
        if not os.path.exists(dst):
            shutil.copytree(self.run, dst, ignore=shutil.ignore_patterns(".lock"))
        return dst

    # ---- inputs
    def task_files(self) -> dict:
        d = self.root / "files"
        if not d.exists():
            d.mkdir()
            good = "a gripping, funny film\tpositive\na dull mess\tnegative\n" * 4
            (d / "train.tsv").write_text(good)
            (d / "dev.tsv").write_text(good)
            (d / "latin1.tsv").write_bytes(good.encode() + "caf\xe9 noir, a bore\tnegative\n".encode("latin-1"))
            (d / "empty.tsv").write_text("")
        return {k: str(d / f"{k}.tsv") for k in ("train", "dev", "latin1", "empty")}

    def nan_prompt(self) -> str:
        path = self.root / "nan_prompt.npy"
        if not path.exists():
            arr = np.ones((5, 384), np.float32)
            arr[1, 3] = np.nan
            np.save(path, arr)
        return str(path)

    def evil_delta(self, listed: bool = False) -> str:
        """The run's delta folder with an extra 3.2 GB (sparse) tensor in its safetensors
        (``listed``: also in delta.json's tree, so the file is self-consistent)."""
        dst = self.root / ("evil_delta_listed" if listed else "evil_delta")
        if not dst.exists():
            shutil.copytree(os.path.join(self.run, "delta"), dst)
            add_sparse_tensor(dst / "delta.safetensors", "peft/evil", GB32)
            if listed:
                meta = json.load(open(dst / "delta.json"))
                meta["tree"]["peft/evil"] = {"shape": [GB32], "dtype": "float32"}
                json.dump(meta, open(dst / "delta.json", "w"))
        return str(dst)

    def evil_model(self) -> str:
        """A copy of the MiniLM HF folder whose model.safetensors has an extra 3.2 GB tensor."""
        dst = self.root / "evil_minilm"
        if not dst.exists():
            from peft_jax.models.registry import resolve
            src = pathlib.Path(resolve("minilm"))
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors"))
            shutil.copyfile(src / "model.safetensors", dst / "model.safetensors")
            add_sparse_tensor(dst / "model.safetensors", "encoder.layer.99.evil.weight", GB32)
        return str(dst)

    def damaged(self) -> str:
        """A copy of the run with result.json removed and every data file of checkpoint 4 with
        one flipped bit (orbax carries no checksum; the recorded digest must catch it)."""
        wd = self.root / "damaged"
        if not wd.exists():
            self.copy("damaged")
            os.remove(wd / "result.json")
            for f in (wd / "checkpoints" / "4" / "state").rglob("*"):
                if f.is_file() and "/d/" in str(f):
                    data = bytearray(f.read_bytes())
                    data[len(data) // 2] ^= 0x01
                    f.write_bytes(bytes(data))
        return str(wd)

    def locked(self, name: str, pid: int, proc_start=None) -> str:
        from peft_jax.train.workdir_lock import LOCK_NAME
        wd = self.copy(name)
        lock = {"pid": pid, "host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00",
                "command": "peft-jax train --config other.py"}
        if proc_start is not None:
            lock["proc_start"] = proc_start
        pathlib.Path(wd, LOCK_NAME).write_text(json.dumps(lock))
        return wd


def add_sparse_tensor(path: pathlib.Path, name: str, elems: int) -> None:
    """Append a float32 tensor of ``elems`` elements to a safetensors file, its bytes a hole
    (a sparse file: a few KB more on disk). The header is rewritten; data is kept."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    header[name] = {"dtype": "F32", "shape": [elems], "data_offsets": [len(data), len(data) + 4 * elems]}
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h + data)
        f.truncate(8 + len(h) + len(data) + 4 * elems)


# ----------------------------------------------------------------------------- checks


def unchanged_result(ctx: Ctx, p) -> str:
    a = json.load(open(os.path.join(ctx.run, "result.json")))
    b = json.load(open(os.path.join(ctx.root, "rerun", "result.json")))
    return ("result.json unchanged" if a == b else "result.json CHANGED ✗")


def completed_result(ctx: Ctx, p) -> str:
    ref = json.load(open(os.path.join(ctx.run, "result.json")))
    path = os.path.join(ctx.root, "no_result", "result.json")
    if not os.path.exists(path):
        return "result.json NOT written ✗"
    got = json.load(open(path))
    same = got.get("metrics") == ref.get("metrics")
    return f"result.json written, metrics {'==' if same else '!= ✗'} the original {got.get('metrics')}"


def metrics_rows(ctx: Ctx, p) -> str:
    wd = ctx.root / "damaged"
    rows = [json.loads(ln) for ln in open(wd / "metrics.jsonl") if ln.strip()]
    # one row per logged step and kind (train/..., eval/...)
    keys = [(r["step"], next(k for k in r if k != "step").split("/")[0]) for r in rows]
    steps = [f"{st} {kind}" for st, kind in keys]
    dup = len(keys) != len(set(keys))
    moved = sorted(os.listdir(wd / "checkpoints.damaged")) if (wd / "checkpoints.damaged").exists() else []
    ref = json.load(open(os.path.join(ctx.run, "result.json")))
    got = json.load(open(wd / "result.json")) if (wd / "result.json").exists() else {}
    same = got.get("metrics") == ref.get("metrics")
    return (f"metrics.jsonl steps {steps}{' DUPLICATES ✗' if dup else ''}; moved aside: {moved}; "
            f"metrics {'==' if same else '!= ✗'} the uninterrupted run")


def refused_untouched(ctx: Ctx, p) -> str:
    wd = pathlib.Path(ctx.root, "refuse")
    return "workdir untouched" if not any(n.startswith("replaced-") for n in os.listdir(wd)) else "MOVED ✗"


def lock_released(ctx: Ctx, p) -> str:
    from peft_jax.train.workdir_lock import LOCK_NAME
    return "lock released" if not os.path.exists(ctx.root / "stale" / LOCK_NAME) else "lock LEFT ✗"


def after_sigterm(ctx: Ctx, p) -> str:
    wd = ctx.root / "sigterm"
    steps = sorted(int(n) for n in os.listdir(wd / "checkpoints") if n.isdigit())
    q = ctx.cli(ctx.train(workdir=str(wd)))
    resumed = [ln for ln in q.stdout.splitlines() if "resumed from step" in ln]
    return (f"checkpoints {steps}; rerun: exit {q.returncode}"
            + (", resumed from step " + resumed[0].rsplit("resumed from step", 1)[1].strip()
               if resumed else ", NOT resumed ✗"))


def traceback_shown(ctx: Ctx, p) -> str:
    return "traceback shown" if "Traceback (most recent call last)" in p.stderr else "NO traceback ✗"


# ----------------------------------------------------------------------------- cases


def _holder():
    """A live process that stands for the trainer holding a workdir."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])


def cases(state: dict) -> list[Case]:
    T = "T"   # shorthand for the table
    K = []
    add = K.append
    # 1. results are never lost
    add(Case(1, "rerun", "rerun of a finished run", lambda c: c.train(workdir=c.copy("rerun")),
             f"{T} (same command again)", 0, r"already finished|^metric|^accuracy", after=unchanged_result))
    add(Case(1, "no_result", "killed after the final checkpoint, before result.json (deleted)",
             lambda c: c.train(workdir=_no_result(c)), f"{T} (result.json removed)", 0,
             r"resumed from|^accuracy", after=completed_result))
    add(Case(1, "resume_false", "train.resume=false on a workdir holding a run",
             lambda c: c.train("--config.train.resume=false", workdir=c.copy("refuse")),
             f"{T} --config.train.resume=false", 2, after=refused_untouched))
    # 2. one writer per workdir
    add(Case(2, "locked", "a live trainer holds the workdir",
             lambda c: c.train(workdir=c.locked("live", state["holder"].pid, state["proc_start"])),
             f"{T} (workdir/.lock of a live pid)", 7))
    add(Case(2, "stale_lock", "a lock left by a killed trainer",
             lambda c: c.train(workdir=c.locked("stale", state["dead_pid"])),
             f"{T} (workdir/.lock of a dead pid)", 0, r"took over|already finished", after=lock_released))
    # 3. checkpoint integrity
    add(Case(3, "bitflip", "one flipped bit in every data file of the newest checkpoint (4)",
             lambda c: c.train(workdir=c.damaged()), f"{T} (checkpoints/4 damaged)", 0,
             r"(?i)warning|resumed from", after=metrics_rows))
    add(Case(3, "empty_step", "an empty step folder (checkpoints/9)",
             lambda c: ["eval", "--workdir", _with_empty_step(c)], "eval --workdir WD (empty checkpoints/9)", 0,
             r"(?i)warn|damaged|checkpoints/9|accuracy="))
    add(Case(3, "bad_meta", "malformed meta/metadata in the newest checkpoint",
             lambda c: ["eval", "--workdir", _with_bad_meta(c)], "eval --workdir WD (checkpoints/4/meta/metadata = '{')", 0,
             r"(?i)warn|damaged|metadata|accuracy="))
    add(Case(3, "other_task", "resume with another task (sst2 -> sst5)",
             lambda c: c.train("--config.task.name=sst5", "--config.train.steps=6", workdir=c.copy("sst5")),
             f"{T} --config.task.name=sst5 --config.train.steps=6", 5))
    add(Case(3, "other_task2", "resume with another task of the same label count (sst2 -> cola)",
             lambda c: c.train("--config.task.name=cola", "--config.train.steps=6", workdir=c.copy("cola")),
             f"{T} --config.task.name=cola --config.train.steps=6", 5))
    add(Case(3, "other_optim", "resume with another optimizer",
             lambda c: c.train("--config.optim.optimizer=sgd", "--config.train.steps=6", workdir=c.copy("sgd")),
             f"{T} --config.optim.optimizer=sgd --config.train.steps=6", 5))
    # 4. non-finite values never reach a checkpoint
    add(Case(4, "lr1e30", "lr=1e30 (explodes at the first update)",
             lambda c: c.train("--config.optim.lr=1e30", "--config.optim.head_lr=1e30"),
             f"{T} --config.optim.lr=1e30 --config.optim.head_lr=1e30", 6))
    add(Case(4, "nan_prompt", "a NaN in the prompt init file",
             lambda c: c.train("--config.peft.methods=prompt", "--config.peft.prompt.length=5",
                               "--config.peft.prompt.init=file", f"--config.peft.prompt.file={c.nan_prompt()}"),
             f"{T} --config.peft.methods=prompt --config.peft.prompt.length=5 "
             "--config.peft.prompt.init=file --config.peft.prompt.file=nan.npy", 4))
    # 5. interrupts
    add(Case(5, "sigterm", "SIGTERM after step 1 (PEFT_JAX_FAULT=sigterm@1: the process signals itself)",
             lambda c: c.train(workdir=str(c.root / "sigterm")), f"{T} + SIGTERM after step 1", 143,
             r"interrupted|preempted", env={"PEFT_JAX_FAULT": "sigterm@1"}, after=after_sigterm))
    add(Case(5, "sigint", "Ctrl-C (SIGINT) after step 1",
             lambda c: c.train(), f"{T} + SIGINT after step 1", 143, r"interrupted|preempted",
             env={"PEFT_JAX_FAULT": "sigint@1"}))
    add(Case(5, "keep0", "train.keep=0", lambda c: c.train("--config.train.keep=0"),
             f"{T} --config.train.keep=0", 2))
    # 6. config errors before anything loads, one line, naming the key, exit 2
    for cid, label, over in [
            ("lr0", "optim.lr 0", ["--config.optim.lr=0"]),
            ("lr_neg", "optim.lr negative", ["--config.optim.lr=-1e-3"]),
            ("accum0", "train.grad_accum=0", ["--config.train.grad_accum=0"]),
            ("mesh0", "mesh.data=0", ["--config.mesh.data=0"]),
            ("mesh_count", "mesh product != device count (1 CPU device)", ["--config.mesh.data=3"]),
            ("rank1000", "LoRA rank larger than the layer (384 wide)", ["--config.peft.lora.rank=1000"]),
            ("verbalizer", "format=verbalizer on a model without an LM head",
             ["--config.task.format=verbalizer"]),
            ("batch0", "batch 0", ["--config.train.batch_size=0"]),
            ("rank0", "LoRA rank 0", ["--config.peft.lora.rank=0"]),
            ("plen0", "prompt length 0", ["--config.peft.methods=prompt", "--config.peft.prompt.length=0"]),
            ("maxlen0", "max_length 0", ["--config.task.max_length=0"]),
            ("dropout", "dropout 1.5", ["--config.peft.lora.dropout=1.5"]),
            ("no_mask", "verbalizer template without {mask}",
             ["--config.model.name=smollm2", "--config.task.format=verbalizer",
              "--config.task.template={sentence} It was great."]),
            ("words", "label-word count != class count",
             ["--config.model.name=smollm2", "--config.task.format=verbalizer",
              "--config.task.label_words=great"]),
            ("class_labels", "class_labels init with fewer prompt tokens than classes",
             ["--config.peft.methods=prompt", "--config.peft.prompt.init=class_labels",
              "--config.peft.prompt.length=1"])]:
        add(Case(6, cid, label, lambda c, over=over: c.train(*over), f"{T} " + " ".join(over), 2))
    add(Case(6, "indivisible", "batch not divisible by data x fsdp (2 CPU devices)",
             lambda c: c.train("--config.mesh.data=2", "--config.train.batch_size=5"),
             f"XLA 2 devices: {T} --config.mesh.data=2 --config.train.batch_size=5", 2,
             env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}))
    # 7. the CLI's error surface
    f = lambda c: c.task_files()   # noqa: E731
    filetask = ["--config.task.name=file", "--config.task.file.label_names=negative,positive",
                "--config.task.train_split=train", "--config.task.eval_split=dev"]
    add(Case(7, "typo", "a misspelled key", lambda c: c.train("--config.optim.lrr=1"),
             f"{T} --config.optim.lrr=1", 2))
    add(Case(7, "latin1", "non-UTF-8 task file",
             lambda c: c.train(*filetask, f"--config.task.file.train={f(c)['latin1']}",
                               f"--config.task.file.dev={f(c)['dev']}"),
             f"{T} --config.task.name=file --config.task.file.train=latin1.tsv ...", 3))
    add(Case(7, "empty_split", "an empty split",
             lambda c: c.train(*filetask, f"--config.task.file.train={f(c)['train']}",
                               f"--config.task.file.dev={f(c)['empty']}"),
             f"{T} --config.task.name=file --config.task.file.dev=empty.tsv ...", 3))
    add(Case(7, "no_file", "task.name=file without a file for the split",
             lambda c: c.train(*filetask), f"{T} --config.task.name=file (no task.file.train)", 2))
    add(Case(7, "eval_untrained", "eval of a workdir without checkpoints",
             lambda c: ["eval", "--config", CONFIG, *SMALL, "--workdir", c.new()],
             "eval --config ... --workdir NEW", 4))
    add(Case(7, "debug", "--debug shows the traceback",
             lambda c: c.train("--config.train.keep=0", "--debug"), f"{T} --config.train.keep=0 --debug", 2,
             r"^error:", after=traceback_shown))
    add(Case(7, "missing_config", "a config file that does not exist",
             lambda c: ["train", "--config", "configs/nope.py"], "train --config configs/nope.py", 2))
    # 8. sizes checked before bytes are read
    add(Case(8, "delta_huge", "delta with an extra 3.2 GB sparse tensor (train.init_from)",
             lambda c: c.train(f"--config.train.init_from={c.evil_delta()}"),
             f"{T} --config.train.init_from=evil_delta/", 4))
    add(Case(8, "delta_listed", "the same, the tensor also listed in delta.json (a consistent file)",
             lambda c: c.train(f"--config.train.init_from={c.evil_delta(listed=True)}"),
             f"{T} --config.train.init_from=evil_delta_listed/", 5))
    add(Case(8, "hf_huge", "HF model.safetensors with an extra 3.2 GB sparse tensor",
             lambda c: c.train(f"--config.model.name={c.evil_model()}"),
             f"{T} --config.model.name=evil_minilm/", 4))
    # 9. eval / export / params use the run's own config
    add(Case(9, "eval", "eval --workdir (no overrides)", lambda c: ["eval", "--workdir", c.run],
             "eval --workdir WD", 0, r"accuracy="))
    add(Case(9, "params", "params --workdir", lambda c: ["params", "--workdir", c.run],
             "params --workdir WD", 0, r"(?i)trainable"))
    add(Case(9, "export", "export --workdir --format delta",
             lambda c: ["export", "--workdir", c.run, "--format", "delta", "--out", str(c.root / "exported")],
             "export --workdir WD --format delta --out DIR", 0, r"^wrote"))
    add(Case(9, "export_hf", "export --workdir --format hf-peft of a run with a task head",
             lambda c: ["export", "--workdir", c.run, "--format", "hf-peft", "--out", str(c.root / "hf")],
             "export --workdir WD --format hf-peft --out DIR", 2))
    add(Case(9, "contradict", "eval with an override that contradicts the run",
             lambda c: ["eval", "--workdir", c.run, "--config.peft.methods=prompt"],
             "eval --workdir WD --config.peft.methods=prompt", 2))
    add(Case(9, "file_differs", "eval with the --config file of another run",
             lambda c: ["eval", "--workdir", c.run, "--config", "configs/main_sst2.py"],
             "eval --workdir WD --config configs/main_sst2.py", 0, r"using the run's config|accuracy="))
    return K


def _no_result(c: Ctx) -> str:
    wd = c.copy("no_result")
    if os.path.exists(os.path.join(wd, "result.json")):
        os.remove(os.path.join(wd, "result.json"))
    return wd


def _with_empty_step(c: Ctx) -> str:
    wd = c.copy("empty_step")
    os.makedirs(os.path.join(wd, "checkpoints", "9"), exist_ok=True)
    return wd


def _with_bad_meta(c: Ctx) -> str:
    wd = c.copy("bad_meta")
    pathlib.Path(wd, "checkpoints", "4", "meta", "metadata").write_text("{")
    return wd


# ----------------------------------------------------------------------------- table


COVERED = [
    ("1", "kill -9 after the final checkpoint, before result.json (real kill)",
     "tests/test_train.py::test_rerun_of_a_finished_run_keeps_its_results"),
    ("1", "train.resume=false + train.overwrite=true moves the old run aside",
     "tests/test_train.py::test_resume_false_on_a_run_is_refused_unless_overwrite_moves_it_aside"),
    ("1", "metrics.jsonl rows after the restored step dropped on resume",
     "tests/test_reliability.py::test_metrics_rows_after_the_restored_step_are_dropped_on_resume"),
    ("2", "two live trainers, stale lock taken over by exactly one of many",
     "tests/test_reliability.py::test_lock_refuses_a_second_writer_and_takes_over_stale_locks, "
     "::test_stale_lock_is_taken_over_by_exactly_one_of_many"),
    ("3", "a flipped bit in any data file; empty / malformed step folders",
     "tests/test_reliability.py::test_flipped_bit_in_any_data_file_is_caught_and_falls_back, "
     "::test_damaged_step_folders_name_the_path_and_fall_back"),
    ("3", "damaged newest checkpoint -> bit-identical to the uninterrupted run",
     "tests/test_reliability_cli.py::test_damaged_latest_checkpoint_falls_back_and_matches_uninterrupted"),
    ("4", "exploding / non-finite updates refused inside the jitted step",
     "tests/test_reliability.py::test_step_refuses_exploding_and_nonfinite_updates"),
    ("5", "kill -9 / SIGTERM / Ctrl-C resume bit-identical; kill -9 inside a save",
     "tests/test_train.py::test_resume_is_bit_identical, ::test_kill_during_save_keeps_previous_checkpoint"),
    ("5", "chaos: kill -9 at random moments (inside saves too) == uninterrupted",
     "tests/test_reliability_cli.py (chaos test)"),
    ("7", "every project error class: one line + its exit code (+ --debug / PEFT_JAX_DEBUG)",
     "tests/test_reliability.py::test_every_project_error_is_one_line_with_its_exit_code"),
    ("8", "peak memory < 200 MB and time < 2 s for the 3.2 GB sparse tensor (delta, HF PEFT adapter)",
     "tests/test_reliability.py::test_delta_with_a_huge_extra_tensor_fails_before_reading_it, "
     "::test_hf_adapter_with_a_huge_extra_tensor_fails_before_reading_it"),
]


def seen(p: subprocess.CompletedProcess, show: str, root: str) -> str:
    """What the user sees: the ``error:`` line(s), else the lines matching ``show``, else the
    last meaningful line; temp paths shortened to ``TMP``."""
    lines = [ln.rstrip() for ln in (p.stdout + "\n" + p.stderr).splitlines() if ln.strip()]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    picked = errors
    if not picked and show:
        picked = [ln for ln in lines if re.search(show, ln)]
    if not picked:
        picked = [ln for ln in lines if not ln.startswith(NOISE)][-1:]
    picked = [re.sub(r"^\[peft_jax\] [^:]+: \w+, methods=.*?(resumed from step \d+)$", r"[peft_jax] ...; \1", ln)
              for ln in picked]
    text = " / ".join(dict.fromkeys(picked))
    text = text.replace(root, "TMP").replace(str(ROOT) + "/", "")
    if "Traceback (most recent call last)" in p.stderr and "--debug" not in p.args:
        text = "✗ TRACEBACK: " + text
    return text


def _cell(s: str, n: int) -> str:
    s = s.replace("|", "\\|").replace("\n", " ")
    return s if len(s) <= n else s[:n - 1] + "…"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="", help="item numbers and/or case ids, comma-separated")
    ap.add_argument("--out", default="", help="also write the markdown here")
    ap.add_argument("--keep", default="", help="build in this folder and keep it (default: a temp dir)")
    ap.add_argument("--width", type=int, default=160, help="truncate 'what the user sees' to this")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args(argv)

    holder = _holder()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    from peft_jax.train.workdir_lock import _proc_start
    state = {"holder": holder, "proc_start": _proc_start(holder.pid), "dead_pid": dead.pid}
    try:
        all_cases = cases(state)
        if args.list:
            for k in all_cases:
                print(f"{k.item} {k.id}: {k.label}")
            return 0
        want = {w.strip() for w in args.cases.split(",") if w.strip()}
        chosen = [k for k in all_cases if not want or k.id in want or str(k.item) in want]
        root = pathlib.Path(args.keep or tempfile.mkdtemp(prefix="reliability_cases_"))
        root.mkdir(parents=True, exist_ok=True)
        ctx = Ctx(root)
        rows, tracebacks, t_all = [], [], time.perf_counter()
        for k in chosen:
            cmd = k.args(ctx)
            t0 = time.perf_counter()
            p = ctx.cli(cmd, k.env)
            dt = time.perf_counter() - t0
            text = _cell(seen(p, k.show, str(root)), args.width)
            if k.after is not None:
                text += " [" + k.after(ctx, p).replace(str(root), "TMP") + "]"
            code = f"{p.returncode}" + ("" if p.returncode == k.code else f" ✗ (documented: {k.code})")
            rows.append((k, text, code, dt))
            if "Traceback (most recent call last)" in p.stderr and "--debug" not in cmd:
                tb = p.stderr[p.stderr.index("Traceback (most recent call last)"):]
                tracebacks.append((k, tb[:3000].replace(str(root), "TMP")))
            print(f"[reliability_cases] {k.item} {k.id}: exit {p.returncode} in {dt:.1f}s",
                  file=sys.stderr, flush=True)
        total = time.perf_counter() - t_all
    finally:
        holder.kill()
        holder.wait()
    out = [f"# Issue 13 cases through the `peft-jax` CLI ({len(rows)} cases, {total:.0f} s)", "",
           f"`T` = `peft-jax train --config {CONFIG} {' '.join(SMALL)} --workdir NEW` "
           "(a fresh workdir unless the case says otherwise); `WD` = the finished short run "
           "(`T` once, each case on its own copy); `TMP` = the temporary folder. "
           "Env: " + " ".join(f"{k}={v}" for k, v in ENV.items() if k != "PYTHONPATH") + ". "
           "✗ marks an exit code other than the documented one or a traceback.", "",
           "| item | case | command | what the user sees | exit code | s |",
           "|---|---|---|---|---|---|"]
    for k, text, code, dt in rows:
        out.append(f"| {k.item} | {_cell(k.label, 80)} | `{_cell(k.shown, 110)}` | "
                   f"{text} | {code} | {dt:.1f} |")
    out += ["", "Covered by tests (kill -9 at random moments, chaos, two live processes, "
            "memory limits), not run here:", ""]
    out += [f"- item {i}: {what}: `{where}`" for i, what, where in COVERED]
    for k, tb in tracebacks:
        out += ["", f"Traceback printed by case {k.item} {k.id} (first 3000 characters):", "",
                "```", tb.rstrip(), "```"]
    out += ["", f"Command: `python benchmarks/reliability_cases.py"
            + (f" --cases {args.cases}" if args.cases else "") + "`"]
    text = "\n".join(out) + "\n"
    print(text)
    if args.out:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(text)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
