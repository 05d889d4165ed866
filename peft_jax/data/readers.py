"""Low-level file readers: each row comes with its file and line number, bad rows raise
``DataError`` naming both (or are skipped and counted when ``on_error="skip"``)."""

from __future__ import annotations

import csv
import json
import os
import warnings
from typing import Optional


class DataError(ValueError):
    """Bad data or data config; the message names the file, line and field where known."""


class EncodingError(DataError):
    """A line whose bytes do not decode with the file's encoding."""


def data_root(root: Optional[str | os.PathLike] = None) -> str:
    """The shared data folder: ``root`` if given, else $PEFT_JAX_DATA, else ``<repo>/../shared/data``."""
    if root is not None:
        return os.fspath(root)
    env = os.environ.get("PEFT_JAX_DATA")
    if env:
        return env
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(os.path.dirname(repo), "shared", "data")


def check_file(path: str) -> str:
    if not os.path.isfile(path):
        where = "" if os.path.isabs(path) else f" (resolved: {os.path.abspath(path)})"
        raise DataError(f"{path}: file not found{where}; built-in tasks read the data root "
                        "$PEFT_JAX_DATA (default: ../shared/data next to the repository)")
    return path


def read_lines(path: str, encoding: str = "utf-8") -> list[tuple[int, str]]:
    """``[(line_number, text)]`` without the line ending; a UTF-8 BOM is dropped. A line that
    does not decode is an :class:`EncodingError` naming ``path:line`` and the byte (no silent
    fallback: pass the file's real ``encoding``, e.g. ``latin-1`` for TREC)."""
    check_file(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    out = []
    for i, line in enumerate(raw.split(b"\n"), start=1):
        if line.endswith(b"\r"):
            line = line[:-1]
        try:
            text = line.decode(encoding)
        except UnicodeDecodeError as e:
            raise EncodingError(f"{path}:{i}: byte 0x{line[e.start]:02x} at column {e.start + 1} "
                                f"is not valid {encoding} text") from None
        except LookupError:
            raise DataError(f"{path}: unknown text encoding {encoding!r}") from None
        out.append((i, text))
    if out and out[-1][1] == "":
        out.pop()  # final newline
    return out


class RowErrors:
    """Collects malformed rows: raises at once (``on_error='raise'``) or counts them ('skip')."""

    def __init__(self, path: str, on_error: str = "raise"):
        if on_error not in ("raise", "skip"):
            raise DataError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.path, self.on_error, self.skipped, self.first = path, on_error, 0, None

    def bad(self, line: int, reason: str) -> None:
        msg = f"{self.path}:{line}: {reason}"
        if self.on_error == "raise":
            raise DataError(msg)
        self.skipped += 1
        self.first = self.first or msg

    def done(self) -> None:
        if self.skipped:
            warnings.warn(f"{self.path}: skipped {self.skipped} malformed rows (first: {self.first})",
                          stacklevel=3)


def read_delimited(path: str, delimiter: str = "\t", header: bool = False, n_fields: Optional[int] = None,
                   min_fields: Optional[int] = None, quoting: bool = False,
                   errors: Optional[RowErrors] = None, encoding: str = "utf-8"
                   ) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """TSV/CSV rows -> ``(header_names, [(line_number, fields)])``.

    ``quoting=False`` splits on the delimiter only (GLUE/SentEval TSVs contain bare quotes);
    ``quoting=True`` uses the csv module (LM-BFF csv files quote sentences with commas).
    Rows with a wrong field count are errors (``errors`` decides raise/skip). Blank lines are skipped.
    """
    errors = errors or RowErrors(path)
    lines = read_lines(path, encoding)
    names: list[str] = []
    rows: list[tuple[int, list[str]]] = []
    if quoting:
        parsed = []
        for ln, text in lines:
            try:
                fields = next(csv.reader([text], delimiter=delimiter))
            except (csv.Error, StopIteration) as e:
                errors.bad(ln, f"cannot parse csv row ({e})")
                continue
            parsed.append((ln, fields))
    else:
        parsed = [(ln, text.split(delimiter)) for ln, text in lines]
    for k, (ln, fields) in enumerate(parsed):
        if header and k == 0:
            names = [f.strip() for f in fields]
            if n_fields is None and min_fields is None:
                n_fields = len(names)
            continue
        if len(fields) == 1 and fields[0].strip() == "":
            continue
        if n_fields is not None and len(fields) != n_fields:
            errors.bad(ln, f"expected {n_fields} fields separated by {delimiter!r}, found {len(fields)}")
            continue
        if min_fields is not None and len(fields) < min_fields:
            errors.bad(ln, f"expected at least {min_fields} fields separated by {delimiter!r}, "
                           f"found {len(fields)}")
            continue
        rows.append((ln, fields))
    return names, rows


def read_jsonl(path: str, errors: Optional[RowErrors] = None,
               encoding: str = "utf-8") -> list[tuple[int, dict]]:
    """JSON lines -> ``[(line_number, object)]``; invalid JSON or a non-object is a row error."""
    errors = errors or RowErrors(path)
    out = []
    for ln, text in read_lines(path, encoding):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            errors.bad(ln, f"invalid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(obj, dict):
            errors.bad(ln, f"expected a JSON object, got {type(obj).__name__}")
            continue
        out.append((ln, obj))
    return out
