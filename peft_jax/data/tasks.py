"""Tasks and the task registry.

An ``Example`` is a plain dict: the task's text fields (str) plus ``"label"`` (int class index,
float for regression, or str target for text-to-text), optionally ``"idx"`` (row id) and
``"group"`` (e.g. the MultiRC question an answer belongs to, for exact match).

A ``Task`` is a frozen description: name, kind, text fields, label names, metric names,
split names, a loader ``(data_root, split) -> list[Example]`` and prompt defaults (template
with placeholders + verbalizer of label words). ``Task.load(split)`` validates what the
loader returns (non-empty, labels in range) so every source fails the same clear way.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Callable, Mapping, Optional, Sequence

from peft_jax.data.readers import DataError, data_root

Example = dict
KINDS = ("classification", "regression", "text2text")


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """A named task. ``loader(root, split)`` gets the resolved data root (str)."""
    name: str
    kind: str
    text_fields: tuple[str, ...]
    splits: tuple[str, ...]
    loader: Callable[[str, str], list]
    label_names: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ("accuracy",)
    label_range: Optional[tuple[float, float]] = None     # regression: (low, high)
    template: Optional[str] = None                        # prompt with {field} and {mask}
    verbalizer: Any = None      # {label name: [words]} or [[words] per class]
    t5_prefix: Optional[str] = None                       # text-to-text task prefix
    description: str = ""
    data_dir: Optional[str] = None                        # overrides the data root

    def __post_init__(self):
        if self.kind not in KINDS:
            raise DataError(f"task {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "classification" and len(self.label_names) < 2:
            raise DataError(f"task {self.name!r}: a classification task needs >= 2 label_names")
        if len(set(self.label_names)) != len(self.label_names):
            raise DataError(f"task {self.name!r}: duplicate label names {self.label_names}")
        if not self.text_fields:
            raise DataError(f"task {self.name!r}: no text_fields")
        if self.verbalizer is not None:
            allowed = self.verbalizer_keys()
            if isinstance(self.verbalizer, Mapping):
                for k in self.verbalizer:
                    if k not in allowed:
                        raise DataError(f"task {self.name!r}: verbalizer key {k!r} is not a label "
                                        f"(labels: {list(allowed)})")
            elif len(self.verbalizer) != len(allowed):  # a list: one entry per class
                raise DataError(f"task {self.name!r}: verbalizer has {len(self.verbalizer)} entries for "
                                f"{len(allowed)} classes {list(allowed)}")

    @property
    def num_labels(self) -> int:
        return len(self.label_names) if self.kind == "classification" else 1

    def verbalizer_keys(self) -> tuple[str, ...]:
        """Classes a verbalizer covers: the label names, or ('low', 'high') for regression."""
        return self.label_names if self.kind == "classification" else ("low", "high")

    def label_index(self, name: str) -> int:
        try:
            return self.label_names.index(name)
        except ValueError:
            raise DataError(f"task {self.name!r}: unknown label {name!r} "
                            f"(labels: {list(self.label_names)})") from None

    def label_text(self, label: Any) -> str:
        """Target text of a label (text-to-text): the class name, or the score with 1 decimal."""
        if self.kind == "classification":
            return self.label_names[int(label)]
        if self.kind == "regression":
            return f"{round(float(label) * 5) / 5:.1f}"  # T5 rounds STS-B to 0.2
        return str(label)

    def load(self, split: str, data_dir: Optional[str] = None) -> list:
        """All examples of ``split`` (a list of dicts). Raises DataError for an unknown or empty
        split, a missing text field, or a label outside the task's labels."""
        if split not in self.splits:
            close = difflib.get_close_matches(split, self.splits, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise DataError(f"task {self.name!r} has no split {split!r} "
                            f"(splits: {', '.join(self.splits)}){hint}")
        root = data_root(data_dir or self.data_dir)
        examples = self.loader(root, split)
        if not examples:
            raise DataError(f"task {self.name!r}: split {split!r} is empty (data root {root})")
        self.validate(examples, where=f"task {self.name!r} split {split!r}")
        return examples

    def validate(self, examples: Sequence[Example], where: str = "") -> None:
        where = where or f"task {self.name!r}"
        for i, ex in enumerate(examples):
            for f in self.text_fields:
                if not isinstance(ex.get(f), str):
                    raise DataError(f"{where}: example {i} has no text field {f!r} "
                                    f"(keys: {sorted(ex)})")
            if "label" not in ex or ex["label"] is None:
                continue  # unlabelled example (pools, test sets without labels)
            y = ex["label"]
            if self.kind == "classification":
                if not isinstance(y, int) or isinstance(y, bool) or not 0 <= y < len(self.label_names):
                    raise DataError(f"{where}: example {i} label {y!r} is not a class index in "
                                    f"[0, {len(self.label_names)})")
            elif self.kind == "regression":
                if not isinstance(y, float) or math.isnan(y):
                    raise DataError(f"{where}: example {i} label {y!r} is not a float score")
                if self.label_range and not self.label_range[0] <= y <= self.label_range[1]:
                    raise DataError(f"{where}: example {i} score {y} outside {self.label_range}")
            elif not isinstance(y, str):
                raise DataError(f"{where}: example {i} target {y!r} is not a string")


class TaskRegistry:
    """Name -> Task (or a factory building one). ``resolve`` handles prefixes like 'tfds:'."""

    def __init__(self):
        self._tasks: dict[str, Any] = {}
        self._resolvers: dict[str, Callable[[str], Task]] = {}

    def register(self, task: Task | Callable[[], Task], name: Optional[str] = None,
                 overwrite: bool = False) -> None:
        name = name or task.name
        if name in self._tasks and not overwrite:
            raise DataError(f"task {name!r} is already registered (pass overwrite=True)")
        self._tasks[name] = task

    def register_prefix(self, prefix: str, resolver: Callable[[str], Task]) -> None:
        self._resolvers[prefix] = resolver

    def names(self) -> list[str]:
        return sorted(self._tasks)

    def get(self, name: str) -> Task:
        for prefix, resolver in self._resolvers.items():
            if name.startswith(prefix):
                return resolver(name[len(prefix):])
        if name not in self._tasks:
            close = difflib.get_close_matches(name, self._tasks, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise DataError(f"unknown task {name!r} (config.task.name){hint} Registered: "
                            f"{', '.join(sorted(self._tasks))}; your own files: "
                            "--config.task.name=file with config.task.file.train/dev/test; a TFDS "
                            "dataset: 'tfds:<name>'")
        t = self._tasks[name]
        return t if isinstance(t, Task) else t()
