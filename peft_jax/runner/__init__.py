"""The config-driven runner behind ``peft-jax train | eval | export | params``.

Where each concern lives:

- :mod:`~peft_jax.runner.experiment`: config -> task, base model, PEFT methods (from the
  registry), the model with their slots;
- :mod:`~peft_jax.runner.data`: which examples (splits, extra rows, mixtures,
  demonstrations) and how they are encoded;
- :mod:`~peft_jax.runner.session`: a prepared run (encoded data, the train state from the
  one builder :mod:`peft_jax.train.builder`, jitted predict); restore without data;
- :mod:`~peft_jax.runner.run`: the training run (loop, checkpoints, selection, test,
  ``result.json``);
- :mod:`~peft_jax.runner.evaluation`, :mod:`~peft_jax.runner.results`,
  :mod:`~peft_jax.runner.export`.
"""

from peft_jax.runner.data import encode_split, load_examples, read_extra_train, mixture_examples
from peft_jax.runner.experiment import Experiment, build_experiment
from peft_jax.runner.export import export_experiment, parameter_report
from peft_jax.runner.run import RunResult, run_experiment
from peft_jax.runner.session import (Session, evaluate_experiment, restore_trained, setup,
                                     zeroshot_experiment)

__all__ = ["Experiment", "RunResult", "Session", "build_experiment", "encode_split", "evaluate_experiment",
           "export_experiment", "load_examples", "mixture_examples", "parameter_report",
           "read_extra_train", "restore_trained", "run_experiment", "setup", "zeroshot_experiment"]
