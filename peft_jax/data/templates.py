"""Prompt templates and verbalizers.

Template syntax: literal text with ``{field}`` placeholders for the example's text fields and
exactly one ``{mask}`` answer slot; ``{field:mod1:mod2}`` applies modifiers:
``lower_first``, ``upper_first``, ``lower``, ``strip_punct`` (drop trailing punctuation, like
LM-BFF's ``*sent-_0*``). ``{{``/``}}`` are literal braces. Whitespace right before a
placeholder belongs to it: the field text or label word is tokenized with a leading space
(what BPE vocabularies need: LM-BFF tokenizes label words as ' great'). Examples (LM-BFF):
``"{sentence} It was {mask}."`` and ``"{premise:strip_punct}? {mask}, {hypothesis:lower_first}"``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Optional, Sequence

from peft_jax.data.readers import DataError

MODIFIERS = ("lower_first", "upper_first", "lower", "strip_punct")
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")


@dataclasses.dataclass(frozen=True)
class Part:
    kind: str                 # "text" | "field" | "mask"
    value: str = ""           # literal text / field name
    mods: tuple[str, ...] = ()
    space: bool = False       # a leading space belongs to the placeholder


@dataclasses.dataclass(frozen=True)
class Template:
    source: str
    parts: tuple[Part, ...]

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(p.value for p in self.parts if p.kind == "field")

    @property
    def mask_index(self) -> int:
        return next(i for i, p in enumerate(self.parts) if p.kind == "mask")

    @property
    def mask_space(self) -> bool:
        return self.parts[self.mask_index].space

    def render(self, example: Mapping, answer: str = "[MASK]") -> str:
        """The prompt as one string (for display and chat templates)."""
        out = []
        for p in self.parts:
            if p.kind == "text":
                out.append(p.value)
            else:
                out.append((" " if p.space else "") + (answer if p.kind == "mask" else
                                                        apply_mods(example[p.value], p.mods)))
        return "".join(out)


def apply_mods(text: str, mods: Sequence[str]) -> str:
    for m in mods:
        if m == "strip_punct":
            text = text.rstrip()
            while text and text[-1] in ".?!,;:":
                text = text[:-1].rstrip()
        elif m == "lower_first":
            text = text[:1].lower() + text[1:]
        elif m == "upper_first":
            text = text[:1].upper() + text[1:]
        elif m == "lower":
            text = text.lower()
    return text


def parse_template(source: str, fields: Optional[Sequence[str]] = None) -> Template:
    """Parse and check a template (DataError: no/duplicate answer slot, unknown field or modifier)."""
    if isinstance(source, Template):
        return source
    parts: list[Part] = []
    pos = 0
    literal = ""
    def raw(text: str) -> str:
        if "{" in text or "}" in text:
            raise DataError(f"template {source!r}: unbalanced brace (use {{{{ and }}}} for literal braces)")
        return text

    for m in _PLACEHOLDER.finditer(source):
        literal += raw(source[pos:m.start()])
        pos = m.end()
        if m.group(0) in ("{{", "}}"):
            literal += m.group(0)[0]
            continue
        name, *mods = [s.strip() for s in m.group(1).split(":")]
        space = literal.endswith(" ")
        if space:
            literal = literal[:-1]
        if literal:
            parts.append(Part("text", literal))
        literal = ""
        for mod in mods:
            if mod not in MODIFIERS:
                raise DataError(f"template {source!r}: unknown modifier {mod!r} on {{{name}}} "
                                f"(modifiers: {', '.join(MODIFIERS)})")
        if name == "mask":
            parts.append(Part("mask", space=space))
        else:
            if fields is not None and name not in fields:
                raise DataError(f"template {source!r}: placeholder {{{name}}} is not a text field of the "
                                f"task (fields: {', '.join(fields)}; answer slot: {{mask}})")
            parts.append(Part("field", name, tuple(mods), space))
    literal += raw(source[pos:])
    if literal:
        parts.append(Part("text", literal))
    n_mask = sum(p.kind == "mask" for p in parts)
    if n_mask != 1:
        raise DataError(f"template {source!r} has {n_mask} answer slots; it needs exactly one {{mask}}")
    return Template(source, tuple(parts))


def verbalizer_words(verbalizer, keys: Sequence[str]) -> list[list[str]]:
    """Label words per class, ordered by ``keys`` (label names). ``verbalizer``: mapping
    name -> word or list of words, or a list (one entry per class)."""
    if verbalizer is None:
        raise DataError("no verbalizer given and the task has no default one")
    if isinstance(verbalizer, Mapping):
        missing = [k for k in keys if k not in verbalizer]
        extra = [k for k in verbalizer if k not in keys]
        if missing or extra:
            raise DataError(f"verbalizer keys {sorted(verbalizer)} do not match the labels {list(keys)}"
                            f" (missing {missing}, unknown {extra})")
        entries = [verbalizer[k] for k in keys]
    else:
        entries = list(verbalizer)
        if len(entries) != len(keys):
            raise DataError(f"verbalizer has {len(entries)} entries for {len(keys)} classes {list(keys)}")
    words = [[w] if isinstance(w, str) else list(w) for w in entries]
    for k, ws in zip(keys, words):
        if not ws or any(not isinstance(w, str) or not w.strip() for w in ws):
            raise DataError(f"verbalizer: class {k!r} needs at least one non-empty label word, got {ws!r}")
    return words
