"""A user's own dataset from files and a few config lines, no code.

    task = task_from_config({
        "name": "ag_news", "files": {"test": "/data/ag_news/test.tsv"}, "format": "tsv",
        "columns": ["text", "label"], "text_fields": ["text"], "label_field": "label",
        "label_names": ["World", "Sports", "Business", "Sci/Tech"]})

Keys: name, files ({split: path}), format (jsonl | tsv | csv; default from the extension),
header (bool, tsv/csv: first row names the columns), columns (names for a headerless file),
text_fields, label_field ("label"), kind (classification | regression | text2text),
label_names (classification; raw labels may be names or indices), label_map (raw -> name),
metrics, template, verbalizer, t5_prefix, on_error ("raise": DataError with file and line;
"skip": drop malformed rows with a warning that counts them), encoding (of the files,
default utf-8; undecodable bytes are a DataError naming file:line, never guessed).
A split file without a single example is a DataError naming the file.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

from peft_jax.data.readers import DataError, EncodingError, RowErrors, read_delimited, read_jsonl
from peft_jax.data.tasks import KINDS, Task

ALLOWED = ("name", "files", "format", "header", "columns", "text_fields", "label_field", "kind",
           "label_names", "label_map", "metrics", "template", "verbalizer", "t5_prefix", "on_error",
           "description", "encoding")


def _fmt(path: str, fmt: Any) -> str:
    if fmt:
        if fmt not in ("jsonl", "tsv", "csv"):
            raise DataError(f"format must be jsonl, tsv or csv, got {fmt!r}")
        return fmt
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if ext in ("jsonl", "json"):
        return "jsonl"
    if ext in ("tsv", "csv"):
        return ext
    raise DataError(f"{path}: cannot infer the format from the extension; set 'format'")


def task_from_config(cfg: Mapping[str, Any]) -> Task:
    """Build a Task from a config dict (see the module docstring for the keys)."""
    cfg = dict(cfg)
    unknown = sorted(set(cfg) - set(ALLOWED))
    if unknown:
        raise DataError(f"task config: unknown keys {unknown} (allowed: {', '.join(ALLOWED)})")
    for k in ("name", "files", "text_fields"):
        if k not in cfg:
            raise DataError(f"task config: missing key {k!r}")
    name = cfg["name"]
    files = dict(cfg["files"])
    if not files:
        raise DataError(f"task config {name!r}: 'files' names no split")
    kind = cfg.get("kind", "classification" if cfg.get("label_names") else "regression")
    if kind not in KINDS:
        raise DataError(f"task config {name!r}: kind must be one of {KINDS}, got {kind!r}")
    labels = tuple(str(x) for x in cfg.get("label_names", ()))
    if kind == "classification" and not labels:
        raise DataError(f"task config {name!r}: a classification task needs 'label_names'")
    label_map = {str(k): str(v) for k, v in dict(cfg.get("label_map") or {}).items()}
    text_fields = tuple(cfg["text_fields"])
    label_field = cfg.get("label_field", "label")
    on_error = cfg.get("on_error", "raise")
    encoding = cfg.get("encoding") or "utf-8"

    def convert(raw: Any, path: str, line: int):
        if raw is None or raw == "":
            raise DataError(f"{path}:{line}: empty label in field {label_field!r}")
        if kind == "regression":
            try:
                y = float(raw)
            except (TypeError, ValueError):
                raise DataError(f"{path}:{line}: label {raw!r} is not a number") from None
            if math.isnan(y):
                raise DataError(f"{path}:{line}: label is NaN")
            return y
        if kind == "text2text":
            return str(raw)
        key = str(raw).strip()
        key = label_map.get(key, key)
        if key in labels:
            return labels.index(key)
        if key.lstrip("-").isdigit() and 0 <= int(key) < len(labels) and not label_map:
            return int(key)
        raise DataError(f"{path}:{line}: unknown label {raw!r} in field {label_field!r} "
                        f"(labels: {list(labels)})")

    def read_rows(path: str, fmt: str, errors: RowErrors) -> list[tuple[int, dict]]:
        """``[(line, {field: value})]`` of one file."""
        if fmt == "jsonl":
            return read_jsonl(path, errors, encoding)
        header = bool(cfg.get("header", False))
        cols = cfg.get("columns")
        if not header and not cols:
            raise DataError(f"task config {name!r}: a {fmt} file without header needs 'columns'")
        names, lines = read_delimited(path, "\t" if fmt == "tsv" else ",", header=header,
                                      n_fields=None if header else len(cols), quoting=fmt == "csv",
                                      errors=errors, encoding=encoding)
        names = list(cols) if cols else names
        return [(ln, dict(zip(names, f))) for ln, f in lines]

    def load(root: str, split: str) -> list:
        path = files[split]
        fmt = _fmt(path, cfg.get("format"))
        errors = RowErrors(path, on_error)
        out = []
        try:
            rows = read_rows(path, fmt, errors)
        except EncodingError as e:
            raise EncodingError(f"{e}; set config.task.file.encoding (task key 'encoding') to "
                                "the file's encoding, e.g. latin-1") from None
        for ln, obj in rows:
            try:
                ex = {}
                for f in text_fields:
                    if f not in obj:
                        raise DataError(f"{path}:{ln}: missing text field {f!r} (fields: {sorted(obj)})")
                    if not isinstance(obj[f], str):
                        raise DataError(f"{path}:{ln}: text field {f!r} is not a string")
                    ex[f] = obj[f]
                if label_field not in obj:
                    raise DataError(f"{path}:{ln}: missing label field {label_field!r}")
                ex["label"] = convert(obj[label_field], path, ln)
            except DataError as e:
                errors.bad(ln, str(e).split(": ", 1)[1] if str(e).startswith(f"{path}:") else str(e))
                continue
            ex["idx"] = len(out)
            out.append(ex)
        errors.done()
        if not out:
            raise DataError(f"{path}: no examples (split {split!r} of task {name!r}"
                            + (f"; {errors.skipped} malformed rows skipped)" if errors.skipped else ")"))
        return out

    return Task(name=name, kind=kind, text_fields=text_fields, splits=tuple(files), loader=load,
                label_names=labels if kind == "classification" else (),
                metrics=tuple(cfg.get("metrics") or (("pearson", "spearman") if kind == "regression"
                                                       else ("accuracy",))),
                template=cfg.get("template"), verbalizer=cfg.get("verbalizer"),
                t5_prefix=cfg.get("t5_prefix", name), description=cfg.get("description", f"user file task {name}"))
