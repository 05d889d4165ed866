"""TFDS datasets as tasks, read without TensorFlow through ``tfds.data_source`` (array_record).

``get_task('tfds:glue/rte')`` (``'tfds:glue/rte@<data_dir>'``) (or ``tfds_task('glue/rte', data_dir=...)``) builds a Task from the
dataset's DatasetInfo: ClassLabel names become label names, float labels make a regression
task, Text features become the text fields (GLUE/SuperGLUE field orders are known). The
dataset must be prepared in array_record format (``builder.download_and_prepare(
file_format='array_record')`` on a machine with network, or a local builder).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from peft_jax.data.readers import DataError
from peft_jax.data.tasks import Task

FIELD_ORDER = {  # catalog datasets whose text-field order matters (FeaturesDict is sorted)
    "glue/mnli": ("premise", "hypothesis"), "glue/rte": ("sentence1", "sentence2"),
    "glue/wnli": ("sentence1", "sentence2"), "glue/ax": ("premise", "hypothesis"),
    "super_glue/boolq": ("passage", "question"), "super_glue/cb": ("premise", "hypothesis"),
    "super_glue/rte": ("premise", "hypothesis"),
    "super_glue/copa": ("premise", "choice1", "choice2", "question"),
    "super_glue/wic": ("word", "sentence1", "sentence2"),
    "super_glue/multirc": ("paragraph", "question", "answer"),
}
METRICS = {"glue/cola": ("mcc", "accuracy"), "glue/mrpc": ("f1", "accuracy"), "glue/qqp": ("f1", "accuracy"),
           "glue/stsb": ("pearson", "spearman"), "super_glue/cb": ("accuracy", "macro_f1"),
           "super_glue/multirc": ("f1a", "em")}


def _builder(name: str, data_dir: Optional[str]):
    import tensorflow_datasets as tfds
    try:
        return tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # unknown name / not prepared
        raise DataError(f"TFDS dataset {name!r} (data_dir={data_dir!r}) cannot be opened: "
                        f"{type(e).__name__}: {e}") from None


def _decode(v):
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, np.ndarray) and v.shape == ():
        return _decode(v.item())
    if isinstance(v, np.generic):
        return v.item()
    return v


def tfds_task(tfds_name: str, data_dir: Optional[str] = None, text_fields: Optional[Sequence[str]] = None,
              label_field: str = "label", name: Optional[str] = None, template: Optional[str] = None,
              verbalizer=None, metrics: Optional[Sequence[str]] = None) -> Task:
    """A Task over a prepared TFDS dataset; splits are the dataset's splits (e.g. 'validation')."""
    import tensorflow_datasets as tfds
    builder = _builder(tfds_name, data_dir)
    info = builder.info
    feats = info.features
    if label_field not in feats:
        raise DataError(f"TFDS {tfds_name!r}: no label feature {label_field!r} "
                        f"(features: {sorted(feats.keys())})")
    lab = feats[label_field]
    if isinstance(lab, tfds.features.ClassLabel):
        kind, labels = "classification", tuple(lab.names)
    elif np.dtype(lab.dtype).kind == "f":
        kind, labels = "regression", ()
    else:
        raise DataError(f"TFDS {tfds_name!r}: label feature {label_field!r} is neither ClassLabel nor float")
    if text_fields is None:
        text_fields = FIELD_ORDER.get(tfds_name) or tuple(
            k for k, f in feats.items() if isinstance(f, tfds.features.Text))
    for f in text_fields:
        if f not in feats:
            raise DataError(f"TFDS {tfds_name!r}: no text feature {f!r} (features: {sorted(feats.keys())})")
    splits = tuple(info.splits.keys())
    if not splits:
        raise DataError(f"TFDS {tfds_name!r} is not prepared in {builder.data_dir!r}: run "
                        "builder.download_and_prepare(file_format='array_record') with network")
    wanted = tuple(text_fields)

    def load(root: str, split: str) -> list:
        try:
            source = tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=False)
        except Exception as e:
            raise DataError(f"TFDS {tfds_name!r} split {split!r}: {type(e).__name__}: {e} (the dataset "
                            "must be prepared with file_format='array_record')") from None
        out = []
        for i in range(len(source)):
            rec = source[i]
            ex = {k: _decode(rec[k]) for k in wanted}
            y = _decode(rec[label_field])
            if kind == "classification":
                ex["label"] = None if int(y) < 0 else int(y)  # GLUE test labels are -1
            else:
                ex["label"] = float(y)
            ex["idx"] = int(_decode(rec["idx"])) if "idx" in rec else i
            out.append(ex)
        return out

    return Task(name=name or f"tfds:{tfds_name}", kind=kind, text_fields=wanted, splits=splits,
                loader=load, label_names=labels,
                metrics=tuple(metrics or METRICS.get(tfds_name, ("pearson", "spearman") if kind == "regression"
                                                     else ("accuracy",))),
                template=template, verbalizer=verbalizer, t5_prefix=tfds_name.split("/")[-1],
                description=f"TFDS {tfds_name} ({builder.data_dir})")


def tfds_task_from_spec(spec: str) -> Task:
    """``'glue/rte'`` or ``'glue/rte@/path/to/tfds_data_dir'`` -> ``tfds_task`` (for 'tfds:' names)."""
    name, _, data_dir = spec.partition("@")
    return tfds_task(name, data_dir=data_dir or None, name=f"tfds:{spec}")
