"""Built-in tasks read from the layouts in ../shared/data (SentEval, LM-BFF k-shot, FewGLUE).

Names follow the papers: sst2 sst5 mr cr subj mpqa trec mrpc cola stsb sts12..sts16
sick-r sick-e (SentEval files); boolq cb copa rte wic wsc multirc (FewGLUE: splits train = 32
shots, dev32, validation = official dev); lmbff/<task> for the LM-BFF 16-shot splits
(splits ``train-<seed>``, ``dev-<seed>`` for seeds 13 21 42 87 100, and ``test``).
Label orders follow LM-BFF where a task appears there (so ``trec`` and ``lmbff/trec`` agree).
"""

from __future__ import annotations

import functools
import os
from typing import Callable

from peft_jax.data.readers import DataError, read_delimited, read_jsonl, read_lines
from peft_jax.data.tasks import Task, TaskRegistry

LMBFF_SEEDS = (13, 21, 42, 87, 100)
SENTIMENT = ("negative", "positive")
SST5 = ("very negative", "negative", "neutral", "positive", "very positive")
TREC = ("description", "entity", "abbreviation", "human", "location", "number")  # LM-BFF order
TREC_CODES = ("DESC", "ENTY", "ABBR", "HUM", "LOC", "NUM")
NLI3 = ("contradiction", "entailment", "neutral")   # LM-BFF MNLI/SNLI order
NLI2 = ("entailment", "not_entailment")
SICK_E = ("entailment", "neutral", "contradiction")  # SentEval order

# LM-BFF manual templates (Gao et al. 2021, Table 1) in this package's syntax: see templates.py.
T_SENT = "{sentence} It was {mask}."
T_THIS = "{sentence} This is {mask}."
T_NLI = "{premise:strip_punct}? {mask}, {hypothesis:lower_first}"
T_PARA = "{sentence1} {mask}, {sentence2:lower_first}"
V_SENT = {"negative": ["terrible"], "positive": ["great"]}
V_SST5 = dict(zip(SST5, (["terrible"], ["bad"], ["okay"], ["good"], ["great"])))
V_TREC = dict(zip(TREC, ([w] for w in ("Description", "Entity", "Expression", "Human",
                                         "Location", "Number"))))
V_NLI3 = {"contradiction": ["No"], "entailment": ["Yes"], "neutral": ["Maybe"]}
V_NLI2 = {"entailment": ["Yes"], "not_entailment": ["No"]}
V_YESNO = {"low": ["No"], "high": ["Yes"]}


def _p(root: str, *parts: str) -> str:
    return os.path.join(root, *parts)


def _label(task: str, raw: str, mapping: dict, path: str, line: int):
    try:
        return mapping[raw.strip()]
    except KeyError:
        raise DataError(f"{path}:{line}: task {task!r}: unknown label {raw.strip()!r} "
                        f"(expected one of {sorted(mapping)})") from None


def _float(raw: str, path: str, line: int) -> float:
    try:
        return float(raw)
    except ValueError:
        raise DataError(f"{path}:{line}: score {raw!r} is not a number") from None


def _index_map(n: int) -> dict:
    return {str(i): i for i in range(n)}


# ---------------------------------------------------------------- SentEval layouts

def sentence_label_tsv(name: str, n_classes: int, path: str) -> list:
    """``sentence<TAB>label`` (SST-2 SentEval files, CoLA train)."""
    _, rows = read_delimited(path, "\t", n_fields=2)
    m = _index_map(n_classes)
    return [{"sentence": f[0].strip(), "label": _label(name, f[1], m, path, ln), "idx": i}
            for i, (ln, f) in enumerate(rows)]


def label_space_sentence(name: str, n_classes: int, path: str) -> list:
    """``label sentence`` (SentEval SST fine-grained files; SentEval splits on the first space)."""
    out, m = [], _index_map(n_classes)
    for ln, text in read_lines(path):
        if not text.strip():
            continue
        if " " not in text:
            raise DataError(f"{path}:{ln}: expected 'label sentence', found {text[:40]!r}")
        lab, sent = text.split(" ", 1)
        out.append({"sentence": sent.strip(), "label": _label(name, lab, m, path, ln), "idx": len(out)})
    return out


def class_files(files: list[tuple[str, int]]) -> list:
    """One sentence per line, one file per class (MR, CR, SUBJ, MPQA). Blank lines are kept as
    empty sentences, as SentEval does (CR has 4, MPQA 3), so counts match SentEval's."""
    out = []
    for path, label in files:
        for ln, text in read_lines(path, encoding="utf-8"):
            out.append({"sentence": text.strip(), "label": label, "idx": len(out)})
    return out


def trec_file(path: str) -> list:
    out = []
    for ln, text in read_lines(path, encoding="latin-1"):
        if not text.strip():
            continue
        head, _, question = text.partition(" ")
        coarse = head.split(":")[0]
        if coarse not in TREC_CODES or not question:
            raise DataError(f"{path}:{ln}: expected 'COARSE:fine question' with COARSE in "
                            f"{TREC_CODES}, found {head!r}")
        out.append({"sentence": question.strip(), "label": TREC_CODES.index(coarse), "idx": len(out)})
    return out


def msr_paraphrase(path: str) -> list:
    _, rows = read_delimited(path, "\t", header=True, n_fields=5)
    return [{"sentence1": f[3], "sentence2": f[4], "label": _label("mrpc", f[0], _index_map(2), path, ln),
             "idx": i} for i, (ln, f) in enumerate(rows)]


def stsb_senteval(path: str) -> list:
    """SentEval STS-B: genre, file, year, id, score, s1, s2 (7 tab-separated fields, no header)."""
    _, rows = read_delimited(path, "\t", min_fields=7)
    return [{"sentence1": f[5], "sentence2": f[6], "label": _float(f[4], path, ln), "idx": i}
            for i, (ln, f) in enumerate(rows)]


STS_YEARS = {
    "sts12": ("STS12-en-test", ("MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews")),
    "sts13": ("STS13-en-test", ("FNWN", "headlines", "OnWN")),
    "sts14": ("STS14-en-test", ("deft-forum", "deft-news", "headlines", "images", "OnWN", "tweet-news")),
    "sts15": ("STS15-en-test", ("answers-forums", "answers-students", "belief", "headlines", "images")),
    "sts16": ("STS16-en-test", ("answer-answer", "headlines", "plagiarism", "postediting",
                                "question-question")),
}


def sts_year(root: str, name: str) -> list:
    """SentEval STS12-16: ``STS.input.<subset>.txt`` pairs + ``STS.gs.<subset>.txt`` scores; pairs
    with an empty gold line are skipped, as SentEval does. Each example keeps its ``subset``."""
    folder, subsets = STS_YEARS[name]
    out = []
    for sub in subsets:
        inp = _p(root, "sts", folder, f"STS.input.{sub}.txt")
        gs = _p(root, "sts", folder, f"STS.gs.{sub}.txt")
        pairs, scores = read_lines(inp), read_lines(gs)
        if len(pairs) != len(scores):
            raise DataError(f"{gs}: {len(scores)} gold lines but {inp} has {len(pairs)} pairs")
        for (ln, pair), (_, score) in zip(pairs, scores):
            if not score.strip():
                continue
            fields = pair.split("\t")
            if len(fields) < 2:
                raise DataError(f"{inp}:{ln}: expected 'sentence1<TAB>sentence2'")
            out.append({"sentence1": fields[0], "sentence2": fields[1],
                        "label": _float(score.strip(), gs, ln), "subset": sub, "idx": len(out)})
    return out


def sick(path: str, entailment: bool) -> list:
    _, rows = read_delimited(path, "\t", header=True, n_fields=5)
    m = {k.upper(): i for i, k in enumerate(SICK_E)}
    return [{"sentence1": f[1], "sentence2": f[2],
             "label": _label("sick-e", f[4], m, path, ln) if entailment else _float(f[3], path, ln),
             "idx": i} for i, (ln, f) in enumerate(rows)]


# ---------------------------------------------------------------- LM-BFF k-shot layout

LMBFF = {
    # name: (folder, ext, has header, text columns, label column, label map or None (float))
    "sst2": ("SST-2", "tsv", True, {"sentence": 0}, 1, _index_map(2)),
    "sst5": ("sst-5", "csv", False, {"sentence": 1}, 0, _index_map(5)),
    "mr": ("mr", "csv", False, {"sentence": 1}, 0, _index_map(2)),
    "cr": ("cr", "csv", False, {"sentence": 1}, 0, _index_map(2)),
    "mpqa": ("mpqa", "csv", False, {"sentence": 1}, 0, _index_map(2)),
    "subj": ("subj", "csv", False, {"sentence": 1}, 0, _index_map(2)),
    "trec": ("trec", "csv", False, {"sentence": 1}, 0, _index_map(6)),
    "cola": ("CoLA", "tsv", False, {"sentence": 3}, 1, _index_map(2)),
    "mrpc": ("MRPC", "tsv", True, {"sentence1": 3, "sentence2": 4}, 0, _index_map(2)),
    "qqp": ("QQP", "tsv", True, {"question1": 3, "question2": 4}, 5, _index_map(2)),
    "stsb": ("STS-B", "tsv", True, {"sentence1": 7, "sentence2": 8}, -1, None),
    "qnli": ("QNLI", "tsv", True, {"question": 1, "sentence": 2}, -1, {k: i for i, k in enumerate(NLI2)}),
    "rte": ("RTE", "tsv", True, {"premise": 1, "hypothesis": 2}, -1, {k: i for i, k in enumerate(NLI2)}),
    "mnli": ("MNLI", "tsv", True, {"premise": 8, "hypothesis": 9}, -1, {k: i for i, k in enumerate(NLI3)}),
    "snli": ("SNLI", "tsv", True, {"premise": 7, "hypothesis": 8}, -1, {k: i for i, k in enumerate(NLI3)}),
}


def lmbff_file(name: str, path: str) -> list:
    """One LM-BFF file, parsed as LM-BFF's processors do (column indices per task)."""
    folder, ext, header, cols, label_col, lmap = LMBFF[name]
    need = max(max(cols.values()), label_col) + 1
    _, rows = read_delimited(path, "," if ext == "csv" else "\t", header=header, quoting=ext == "csv",
                             n_fields=None, min_fields=need)
    out = []
    for i, (ln, f) in enumerate(rows):
        ex = {k: f[c] for k, c in cols.items()}
        ex["label"] = _float(f[label_col], path, ln) if lmap is None else \
            _label(f"lmbff/{name}", f[label_col], lmap, path, ln)
        ex["idx"] = i
        out.append(ex)
    return out


def lmbff_loader(name: str) -> Callable[[str, str], list]:
    folder, ext = LMBFF[name][:2]

    def load(root: str, split: str) -> list:
        base = _p(root, "lm_bff_kshot", folder)
        if split == "test":
            path = _p(base, f"test.{ext}")
            if not os.path.isfile(path):
                raise DataError(f"{path}: the LM-BFF test file of {name!r} is not in this data snapshot "
                                f"(upstream file too large); use the TFDS task 'tfds:glue/{name}'")
            return lmbff_file(name, path)
        kind, seed = split.split("-")
        fname = "dev_matched" if (kind == "dev" and name == "mnli") else kind
        return lmbff_file(name, _p(base, f"16-{seed}", f"{fname}.{ext}"))
    return load


def lmbff_splits(seed: int) -> tuple[str, str]:
    """Names of the LM-BFF few-shot train/dev splits of one seed: ('train-13', 'dev-13')."""
    if seed not in LMBFF_SEEDS:
        raise DataError(f"LM-BFF splits exist for seeds {LMBFF_SEEDS}, not {seed}")
    return f"train-{seed}", f"dev-{seed}"


# ---------------------------------------------------------------- FewGLUE / SuperGLUE jsonl

def _bool_label(v, path, ln):
    if isinstance(v, bool):
        return int(v)
    if v in ("true", "True", "false", "False"):
        return int(v in ("true", "True"))
    if v in (0, 1):
        return int(v)
    raise DataError(f"{path}:{ln}: label {v!r} is not a boolean")


def _need(obj: dict, keys, path, ln):
    for k in keys:
        if k not in obj:
            raise DataError(f"{path}:{ln}: missing field {k!r} (fields: {sorted(obj)})")


SUPERGLUE = {  # name: (folder, text fields, label names)
    "boolq": ("BoolQ", ("passage", "question"), ("False", "True")),
    "cb": ("CB", ("premise", "hypothesis"), ("entailment", "contradiction", "neutral")),
    "copa": ("COPA", ("premise", "choice1", "choice2", "question"), ("choice1", "choice2")),
    "rte": ("RTE", ("premise", "hypothesis"), NLI2),
    "wic": ("WiC", ("word", "sentence1", "sentence2"), ("False", "True")),
    "wsc": ("WSC", ("text", "span1_text", "span2_text"), ("False", "True")),
    "multirc": ("MultiRC", ("paragraph", "question", "answer"), ("False", "True")),
}
SUPERGLUE_FILES = {"train": "train.jsonl", "dev32": "dev32.jsonl", "validation": "val.jsonl"}


def superglue_file(name: str, path: str) -> list:
    folder, fields, labels = SUPERGLUE[name]
    out = []
    for ln, obj in read_jsonl(path):
        if name == "multirc":
            _need(obj, ["passage"], path, ln)
            p = obj["passage"]
            for q in p["questions"]:
                for a in q["answers"]:
                    out.append({"paragraph": p["text"], "question": q["question"], "answer": a["text"],
                                "label": _bool_label(a.get("label"), path, ln),
                                "group": f"{obj.get('idx', ln)}-{q.get('idx')}", "idx": len(out)})
            continue
        if name == "wsc":
            _need(obj, ["text", "target"], path, ln)
            t = obj["target"]
            row = {"text": obj["text"], "span1_text": t["span1_text"], "span2_text": t["span2_text"],
                   "span1_index": t["span1_index"], "span2_index": t["span2_index"]}
        else:
            _need(obj, fields, path, ln)
            row = {k: obj[k] for k in fields}
            if name == "wic":
                row.update({k: obj[k] for k in ("start1", "end1", "start2", "end2") if k in obj})
        _need(obj, ["label"], path, ln)
        v = obj["label"]
        if name in ("cb", "rte"):
            row["label"] = _label(name, str(v), {k: i for i, k in enumerate(labels)}, path, ln)
        elif name == "copa":
            if v not in (0, 1):
                raise DataError(f"{path}:{ln}: COPA label {v!r} is not 0 or 1")
            row["label"] = int(v)
        else:
            row["label"] = _bool_label(v, path, ln)
        row["idx"] = len(out)
        out.append(row)
    return out


# ---------------------------------------------------------------- registration

def _tsk(name, kind, fields, splits, loader, labels=(), metrics=("accuracy",), **kw) -> Task:
    return Task(name=name, kind=kind, text_fields=tuple(fields), splits=tuple(splits), loader=loader,
                label_names=tuple(labels), metrics=tuple(metrics), **kw)


def _split_files(files: dict, reader: Callable[[str], list]) -> Callable[[str, str], list]:
    def load(root: str, split: str) -> list:
        return reader(_p(root, *files[split]))
    return load


def builtin_tasks() -> list[Task]:
    """Every task that ../shared/data holds (no file is read here)."""
    S = functools.partial
    tasks = [
        _tsk("sst2", "classification", ["sentence"], ["train", "dev", "test"],
             _split_files({s: ("sst2", f"sentiment-{s}") for s in ("train", "dev", "test")},
                          S(sentence_label_tsv, "sst2", 2)),
             SENTIMENT, template=T_SENT, verbalizer=V_SENT, t5_prefix="sst2",
             description="SST-2 binary sentiment (SentEval copy of GLUE SST-2; test has labels)"),
        _tsk("sst5", "classification", ["sentence"], ["train", "dev", "test"],
             _split_files({s: ("sst5", f"sentiment-{s}") for s in ("train", "dev", "test")},
                          S(label_space_sentence, "sst5", 5)),
             SST5, template=T_SENT, verbalizer=V_SST5, t5_prefix="sst5",
             description="SST fine-grained, 5 classes (SentEval files: 'label sentence')"),
        _tsk("trec", "classification", ["sentence"], ["train", "test"],
             _split_files({"train": ("trec", "train_5500.label"), "test": ("trec", "TREC_10.label")},
                          trec_file),
             TREC, template="{mask}: {sentence}", verbalizer=V_TREC, t5_prefix="trec",
             description="TREC question type, 6 coarse classes (LM-BFF label order)"),
        _tsk("mrpc", "classification", ["sentence1", "sentence2"], ["train", "test"],
             _split_files({"train": ("mrpc", "msr_paraphrase_train.txt"),
                           "test": ("mrpc", "msr_paraphrase_test.txt")}, msr_paraphrase),
             ("not_equivalent", "equivalent"), metrics=("f1", "accuracy"), template=T_PARA,
             verbalizer={"not_equivalent": ["No"], "equivalent": ["Yes"]}, t5_prefix="mrpc",
             description="MSR paraphrase corpus (SentEval files)"),
        _tsk("cola", "classification", ["sentence"], ["train", "dev"],
             lambda root, split: sentence_label_tsv("cola", 2, _p(root, "cola", "train.tsv"))
             if split == "train" else lmbff_file("cola", _p(root, "lm_bff_kshot", "CoLA", "test.tsv")),
             ("unacceptable", "acceptable"), metrics=("mcc", "accuracy"), template=T_THIS,
             verbalizer={"unacceptable": ["incorrect"], "acceptable": ["correct"]}, t5_prefix="cola",
             description="CoLA; dev = GLUE CoLA dev (the LM-BFF test file)"),
        _tsk("stsb", "regression", ["sentence1", "sentence2"], ["train", "dev", "test"],
             _split_files({s: ("stsb", f"sts-{s}.csv") for s in ("train", "dev", "test")}, stsb_senteval),
             metrics=("pearson", "spearman"), label_range=(0.0, 5.0), template=T_PARA,
             verbalizer=V_YESNO, t5_prefix="stsb",
             description="STS benchmark (SentEval: tokenized, lowercased), scores 0-5"),
        _tsk("sick-r", "regression", ["sentence1", "sentence2"], ["train", "dev", "test"],
             _split_files({"train": ("sick", "SICK_train.txt"), "dev": ("sick", "SICK_trial.txt"),
                           "test": ("sick", "SICK_test_annotated.txt")}, S(sick, entailment=False)),
             metrics=("pearson", "spearman"), label_range=(1.0, 5.0), template=T_PARA,
             verbalizer=V_YESNO, t5_prefix="sick", description="SICK relatedness, scores 1-5"),
        _tsk("sick-e", "classification", ["sentence1", "sentence2"], ["train", "dev", "test"],
             _split_files({"train": ("sick", "SICK_train.txt"), "dev": ("sick", "SICK_trial.txt"),
                           "test": ("sick", "SICK_test_annotated.txt")}, S(sick, entailment=True)),
             SICK_E, template="{sentence1:strip_punct}? {mask}, {sentence2:lower_first}",
             verbalizer={"entailment": ["Yes"], "neutral": ["Maybe"], "contradiction": ["No"]},
             t5_prefix="sick", description="SICK entailment, 3 classes"),
    ]
    for name, files, labels in (
            ("mr", (("rt-polarity.neg", 0), ("rt-polarity.pos", 1)), SENTIMENT),
            ("cr", (("custrev.neg", 0), ("custrev.pos", 1)), SENTIMENT),
            ("subj", (("subj.subjective", 0), ("subj.objective", 1)), ("subjective", "objective")),
            ("mpqa", (("mpqa.neg", 0), ("mpqa.pos", 1)), SENTIMENT)):
        verb = {"subjective": ["subjective"], "objective": ["objective"]} if name == "subj" else V_SENT
        tasks.append(_tsk(
            name, "classification", ["sentence"], ["all"],
            (lambda n, fs: lambda root, split: class_files([(_p(root, n, f), y) for f, y in fs]))(name, files),
            labels, template=T_THIS if name == "subj" else T_SENT, verbalizer=verb, t5_prefix=name,
            description=f"{name.upper()} (SentEval files, one per class; no official split: 'all')"))
    for name in STS_YEARS:
        tasks.append(_tsk(name, "regression", ["sentence1", "sentence2"], ["test"],
                          (lambda n: lambda root, split: sts_year(root, n))(name),
                          metrics=("spearman", "pearson"), label_range=(0.0, 5.0), template=T_PARA,
                          verbalizer=V_YESNO, t5_prefix="sts",
                          description=f"{name.upper()} test pairs (SentEval layout), field 'subset'"))
    sg_templates = {
        "boolq": ("{passage} Question: {question}? Answer: {mask}.", {"False": ["No"], "True": ["Yes"]}),
        "cb": ("{hypothesis}? {mask}, {premise}", {"entailment": ["Yes"], "contradiction": ["No"],
                                                     "neutral": ["Maybe"]}),
        "rte": ("{hypothesis}? {mask}, {premise}", V_NLI2),
        "wic": ("{sentence1} {sentence2} Does {word} have the same meaning in both sentences? {mask}.",
                {"False": ["No"], "True": ["Yes"]}),
        "wsc": ("{text} Does the pronoun '{span2_text}' refer to {span1_text}? {mask}.",
                {"False": ["No"], "True": ["Yes"]}),
        "multirc": ("{paragraph} Question: {question} Is it {answer}? {mask}.",
                    {"False": ["No"], "True": ["Yes"]}),
        "copa": (None, None),
    }
    for name, (folder, fields, labels) in SUPERGLUE.items():
        tmpl, verb = sg_templates[name]
        tasks.append(_tsk(
            name, "classification", fields, tuple(SUPERGLUE_FILES),
            (lambda n, d: lambda root, split: superglue_file(n, _p(root, "superglue", d,
                                                                  SUPERGLUE_FILES[split])))(name, folder),
            labels, metrics={"cb": ("accuracy", "macro_f1"), "multirc": ("f1a", "em")}.get(name, ("accuracy",)),
            template=tmpl, verbalizer=verb, t5_prefix=name,
            description=f"SuperGLUE {folder}: FewGLUE 32-shot train, dev32, official validation"))
    base = {t.name: t for t in tasks}
    lm_templates = {"qnli": ("{question:strip_punct}? {mask}, {sentence:lower_first}", V_NLI2),
                    "rte": (T_NLI, V_NLI2), "mnli": (T_NLI, V_NLI3), "snli": (T_NLI, V_NLI3),
                    "qqp": ("{question1} {mask}, {question2:lower_first}",
                            {"not_duplicate": ["No"], "duplicate": ["Yes"]})}
    for name, (folder, ext, header, cols, label_col, lmap) in LMBFF.items():
        # 'test' is listed for all: MNLI/SNLI/QQP's loader explains that the file is absent.
        splits = [f"{k}-{s}" for s in LMBFF_SEEDS for k in ("train", "dev")] + ["test"]
        if name in base and name != "rte":
            b = base[name]
            labels, kind, metrics, tmpl, verb = b.label_names, b.kind, b.metrics, b.template, b.verbalizer
        else:
            tmpl, verb = lm_templates[name]
            labels = NLI3 if name in ("mnli", "snli") else (NLI2 if name in ("qnli", "rte") else ("not_duplicate", "duplicate"))
            kind, metrics = "classification", ("f1", "accuracy") if name == "qqp" else ("accuracy",)
        tasks.append(_tsk(f"lmbff/{name}", kind, list(cols), splits, lmbff_loader(name), labels,
                          metrics=metrics, template=tmpl, verbalizer=verb, t5_prefix=name,
                          label_range=(0.0, 5.0) if kind == "regression" else None,
                          description=f"LM-BFF 16-shot {folder} (seeds {LMBFF_SEEDS}); test = GLUE/full test"))
    return tasks


def default_registry() -> TaskRegistry:
    reg = TaskRegistry()
    for t in builtin_tasks():
        reg.register(t)
    from peft_jax.data.tfds_source import tfds_task_from_spec
    reg.register_prefix("tfds:", tfds_task_from_spec)
    return reg
