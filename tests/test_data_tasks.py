"""Task layer: every registered task loads from ../shared/data with the documented row counts
and label mapping; LM-BFF files load identically to an independent parse; user-file tasks,
TFDS without TensorFlow, and bad input."""

import collections
import csv
import json
import sys

import numpy as np
import pytest

from peft_jax.data import (LMBFF_SEEDS, DataError, get_task, list_tasks, parse_template, task_from_config,
                           tfds_task)
from peft_jax.data.tasks import Task, TaskRegistry

# Row counts stated in ../shared/data/README.md and the SOURCE.md files.
COUNTS = {
    "sst2": {"train": 67349, "dev": 872, "test": 1821},
    "sst5": {"train": 8544, "dev": 1101, "test": 2210},
    "mr": {"all": 10662}, "cr": {"all": 3775}, "subj": {"all": 10000}, "mpqa": {"all": 10606},
    "trec": {"train": 5452, "test": 500},
    "mrpc": {"train": 4076, "test": 1725},
    "cola": {"train": 8551, "dev": 1043},
    "stsb": {"train": 5749, "dev": 1500, "test": 1379},
    "sts12": {"test": 3108}, "sts13": {"test": 1500}, "sts14": {"test": 3750}, "sts15": {"test": 3000},
    "sts16": {"test": 1186},
    "sick-r": {"train": 4500, "dev": 500, "test": 4927}, "sick-e": {"train": 4500, "dev": 500, "test": 4927},
    "boolq": {"train": 32, "dev32": 32, "validation": 3270},
    "cb": {"train": 32, "dev32": 32, "validation": 56},
    "copa": {"train": 32, "dev32": 32, "validation": 100},
    "rte": {"train": 32, "dev32": 32, "validation": 277},
    "wic": {"train": 32, "dev32": 32, "validation": 638},
    "wsc": {"train": 32, "dev32": 32, "validation": 104},
    "multirc": {"validation": 4848},
}
# LM-BFF: (train/dev rows per seed, test rows or None when not in the snapshot)
LMBFF_COUNTS = {"sst2": (32, 872), "sst5": (80, 2210), "mr": (32, 2000), "cr": (32, 2000),
                "mpqa": (32, 2000), "subj": (32, 2000), "trec": (96, 500), "cola": (32, 1043),
                "mrpc": (32, 408), "qnli": (32, 5463), "rte": (32, 277), "stsb": (32, 1500),
                "mnli": (48, None), "snli": (48, None), "qqp": (32, None)}
CLASSES = {"sst2": 2, "sst5": 5, "mr": 2, "cr": 2, "subj": 2, "mpqa": 2, "trec": 6, "cola": 2, "mrpc": 2,
           "qnli": 2, "rte": 2, "mnli": 3, "snli": 3, "qqp": 2}


def test_module_docstring_lists_every_registered_task():
    import peft_jax.data as data
    for name in list_tasks():
        assert f"``{name}``" in data.__doc__, name


def test_registry_names():
    names = set(list_tasks())
    expected = set(COUNTS) | {f"lmbff/{n}" for n in LMBFF_COUNTS}
    assert expected <= names
    assert "ag_news" not in names and not any("ag_news" in n for n in names)


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_builtin_row_counts(shared_data, name):
    task = get_task(name)
    for split, n in COUNTS[name].items():
        ex = task.load(split, data_dir=str(shared_data))
        assert len(ex) == n, (name, split)
        if task.kind == "classification":
            labels = {e["label"] for e in ex}
            assert labels <= set(range(len(task.label_names)))
        else:
            ys = np.array([e["label"] for e in ex])
            assert ys.min() >= task.label_range[0] and ys.max() <= task.label_range[1]


def test_class_balance_and_label_meaning(shared_data):
    d = str(shared_data)
    c = collections.Counter(e["label"] for e in get_task("mr").load("all", d))
    assert c == {0: 5331, 1: 5331}
    c = collections.Counter(e["label"] for e in get_task("cr").load("all", d))
    assert c == {1: 2407, 0: 1368}  # custrev.pos lines / custrev.neg lines
    c = collections.Counter(e["label"] for e in get_task("mpqa").load("all", d))
    assert c == {1: 3312, 0: 7294}
    subj = get_task("subj")
    ex = subj.load("all", d)
    first_obj = open(shared_data / "subj" / "subj.objective", encoding="utf-8").readline().strip()
    assert [e["label"] for e in ex if e["sentence"] == first_obj] == [subj.label_index("objective")]
    # BoolQ validation: labels are JSON booleans; True count must survive the mapping.
    raw = [json.loads(l)["label"] for l in open(shared_data / "superglue" / "BoolQ" / "val.jsonl")]
    boolq = get_task("boolq")
    got = [e["label"] for e in boolq.load("validation", d)]
    assert got == [boolq.label_index("True") if r else boolq.label_index("False") for r in raw]
    # SICK-E: the header row names the columns; first train pair is NEUTRAL.
    sick = get_task("sick-e").load("train", d)
    assert get_task("sick-e").label_names[sick[0]["label"]] == "neutral"
    # MultiRC: 83 paragraphs, 953 questions, 4,848 answer options (validation).
    mrc = get_task("multirc").load("validation", d)
    assert len({e["group"] for e in mrc}) == 953 and len({e["paragraph"] for e in mrc}) == 83
    assert len({e["group"] for e in get_task("multirc").load("train", d)}) == 32
    # STS15: blank gold lines are skipped, all subsets present.
    sts15 = get_task("sts15").load("test", d)
    assert set(e["subset"] for e in sts15) == {"answers-forums", "answers-students", "belief", "headlines",
                                              "images"}


@pytest.mark.parametrize("name,full,split", [("trec", "trec", "test"), ("subj", "subj", "all"),
                                             ("mr", "mr", "all"), ("cr", "cr", "all"),
                                             ("mpqa", "mpqa", "all"), ("sst2", "sst2", "dev"),
                                             ("sst5", "sst5", "test"), ("cola", "cola", "dev"),
                                             ("rte", "rte", "validation"), ("mrpc", "mrpc", "train")])
def test_lmbff_labels_agree_with_full_datasets(shared_data, name, full, split):
    """Same sentence -> same class in the LM-BFF test file and in the full dataset: the label
    orders of the two loaders agree (e.g. TREC's LM-BFF order DESC, ENTY, ABBR, HUM, LOC, NUM)."""
    d = str(shared_data)
    lm = get_task(f"lmbff/{name}").load("test", d)
    ref = get_task(full).load(split, d)
    assert get_task(f"lmbff/{name}").label_names == get_task(full).label_names
    key = lambda e: tuple(e[f].strip().lower() for f in get_task(f"lmbff/{name}").text_fields)
    ref_labels = collections.defaultdict(set)
    for e in ref:
        ref_labels[tuple(e[f].strip().lower() for f in get_task(full).text_fields)].add(e["label"])
    matched = [(e["label"], ref_labels[key(e)]) for e in lm if len(ref_labels.get(key(e), ())) == 1]
    assert len(matched) >= 0.2 * len(lm), f"only {len(matched)} of {len(lm)} sentences matched"
    wrong = [(y, r) for y, r in matched if {y} != r]
    assert not wrong, wrong[:5]


def _independent_lmbff(path, ext, header, cols, label_col):
    rows = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f) if ext == "csv" else (l.rstrip("\n").rstrip("\r").split("\t") for l in f)
        for k, r in enumerate(reader):
            if header and k == 0:
                continue
            rows.append((tuple(r[c] for c in cols), r[label_col]))
    return rows


LMBFF_LAYOUT = {  # folder, ext, header, text columns, label column (as in LM-BFF's processors)
    "sst2": ("SST-2", "tsv", True, [0], 1), "sst5": ("sst-5", "csv", False, [1], 0),
    "mr": ("mr", "csv", False, [1], 0), "cr": ("cr", "csv", False, [1], 0),
    "mpqa": ("mpqa", "csv", False, [1], 0), "subj": ("subj", "csv", False, [1], 0),
    "trec": ("trec", "csv", False, [1], 0), "cola": ("CoLA", "tsv", False, [3], 1),
    "mrpc": ("MRPC", "tsv", True, [3, 4], 0), "qqp": ("QQP", "tsv", True, [3, 4], 5),
    "stsb": ("STS-B", "tsv", True, [7, 8], 9), "qnli": ("QNLI", "tsv", True, [1, 2], 3),
    "rte": ("RTE", "tsv", True, [1, 2], 3), "mnli": ("MNLI", "tsv", True, [8, 9], -1),
    "snli": ("SNLI", "tsv", True, [7, 8], -1),  # some SNLI rows have label1..5: gold is last
}


@pytest.mark.parametrize("name", sorted(LMBFF_COUNTS))
def test_lmbff_splits_load_identically(shared_data, name):
    task = get_task(f"lmbff/{name}")
    folder, ext, header, cols, label_col = LMBFF_LAYOUT[name]
    k_rows, n_test = LMBFF_COUNTS[name]
    for seed in LMBFF_SEEDS:
        for kind in ("train", "dev"):
            fname = "dev_matched" if (name == "mnli" and kind == "dev") else kind
            ref = _independent_lmbff(shared_data / "lm_bff_kshot" / folder / f"16-{seed}" / f"{fname}.{ext}",
                                     ext, header, cols, label_col)
            got = task.load(f"{kind}-{seed}", str(shared_data))
            assert len(got) == len(ref) == k_rows
            assert [tuple(e[f] for f in task.text_fields) for e in got] == [r[0] for r in ref]
            if task.kind == "regression":
                assert [e["label"] for e in got] == [float(r[1]) for r in ref]
            else:
                names = task.label_names
                raw_to_name = (lambda r: names[int(r)]) if r_is_int(ref) else (lambda r: r)
                assert [names[e["label"]] for e in got] == [raw_to_name(r[1]) for r in ref]
                counts = collections.Counter(e["label"] for e in got)
                assert sorted(counts.values()) == [k_rows // CLASSES[name]] * CLASSES[name]  # balanced
    if n_test is None:
        with pytest.raises(DataError, match="not in this data snapshot"):
            task.load("test", str(shared_data))
    else:
        assert len(task.load("test", str(shared_data))) == n_test


def r_is_int(ref):
    return all(r[1].strip().isdigit() for r in ref)


def test_user_file_task_ag_news(shared_data):
    cfg = {"name": "my_news", "files": {"test": str(shared_data / "ag_news" / "test.tsv")}, "format": "tsv",
           "columns": ["text", "label"], "text_fields": ["text"], "label_field": "label",
           "label_names": ["World", "Sports", "Business", "Sci/Tech"]}
    task = task_from_config(cfg)
    ex = task.load("test")
    assert len(ex) == 7600
    assert collections.Counter(e["label"] for e in ex) == {0: 1900, 1: 1900, 2: 1900, 3: 1900}
    first = open(shared_data / "ag_news" / "test.tsv", encoding="utf-8").readline().rstrip("\n").split("\t")
    assert ex[0]["text"] == first[0] and task.label_names[ex[0]["label"]] == first[1]
    reg = TaskRegistry()
    reg.register(task)
    assert reg.get("my_news") is task
    with pytest.raises(DataError, match="already registered"):
        reg.register(task)


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_malformed_row_error_names_file_and_line(tmp_path):
    p = _write(tmp_path / "d.tsv", "good one\tpos\nno tab here\nfine\tneg\nalso\tbad\textra\n")
    cfg = {"name": "t", "files": {"train": p}, "columns": ["text", "label"], "text_fields": ["text"],
           "label_names": ["neg", "pos"]}
    with pytest.raises(DataError, match=r"d\.tsv:2: expected 2 fields"):
        task_from_config(cfg).load("train")
    with pytest.warns(UserWarning, match=r"skipped 2 malformed rows \(first: .*d\.tsv:2"):
        ex = task_from_config({**cfg, "on_error": "skip"}).load("train")
    assert [e["text"] for e in ex] == ["good one", "fine"]


def test_unknown_label_and_bad_json(tmp_path):
    p = _write(tmp_path / "d.jsonl", '{"text": "a", "label": "pos"}\n{"text": "b", "label": "maybe"}\n')
    cfg = {"name": "t", "files": {"train": p}, "text_fields": ["text"], "label_names": ["neg", "pos"]}
    with pytest.raises(DataError, match=r"d\.jsonl:2: unknown label 'maybe'"):
        task_from_config(cfg).load("train")
    p2 = _write(tmp_path / "e.jsonl", '{"text": "a", "label": "pos"}\n{"text": "b", "label": \n')
    with pytest.raises(DataError, match=r"e\.jsonl:2: invalid JSON"):
        task_from_config({**cfg, "files": {"train": p2}}).load("train")
    p3 = _write(tmp_path / "f.jsonl", '{"txt": "a", "label": "pos"}\n')
    with pytest.raises(DataError, match=r"f\.jsonl:1: missing text field 'text'"):
        task_from_config({**cfg, "files": {"train": p3}}).load("train")
    with pytest.raises(DataError, match="unknown keys"):
        task_from_config({**cfg, "label_colum": "y"})


def test_unknown_label_in_builtin_layout(tmp_path):
    (tmp_path / "sst2").mkdir()
    _write(tmp_path / "sst2" / "sentiment-dev", "fine film\t1\nbad film\t7\n")
    with pytest.raises(DataError, match=r"sentiment-dev:2: task 'sst2': unknown label '7'"):
        get_task("sst2").load("dev", str(tmp_path))


def test_empty_split_and_unknown_split(tmp_path):
    p = _write(tmp_path / "empty.tsv", "")
    cfg = {"name": "t", "files": {"train": p}, "columns": ["text", "label"], "text_fields": ["text"],
           "label_names": ["neg", "pos"]}
    with pytest.raises(DataError, match=r"empty.tsv: no examples \(split 'train' of task 't'\)"):
        task_from_config(cfg).load("train")
    with pytest.raises(DataError, match="has no split 'dev'"):
        task_from_config(cfg).load("dev")
    with pytest.raises(DataError, match="did you mean sst2"):
        get_task("sst-2x")


def test_template_errors():
    with pytest.raises(DataError, match="needs exactly one {mask}"):
        parse_template("{sentence} It was great.", ["sentence"])
    with pytest.raises(DataError, match="2 answer slots"):
        parse_template("{mask} {sentence} {mask}", ["sentence"])
    with pytest.raises(DataError, match="not a text field"):
        parse_template("{sentense} It was {mask}.", ["sentence"])
    with pytest.raises(DataError, match="unknown modifier"):
        parse_template("{sentence:shout} {mask}", ["sentence"])
    t = parse_template("{premise:strip_punct}? {mask}, {hypothesis:lower_first} {{x}}", ["premise", "hypothesis"])
    assert t.render({"premise": "It rained.", "hypothesis": "The Ground is wet."}, "Yes") == \
        "It rained? Yes, the Ground is wet. {x}"


def test_register_task_rejects_bad_verbalizer():
    with pytest.raises(DataError, match="verbalizer key 'pos' is not a label"):
        Task(name="x", kind="classification", text_fields=("sentence",), splits=("train",),
             loader=lambda r, s: [], label_names=("negative", "positive"), verbalizer={"pos": ["good"]})


class TestTFDS:
    """A locally built TFDS dataset (array_record), read through tfds.data_source without TF."""

    @pytest.fixture(scope="class")
    def tfds_dir(self, tmp_path_factory):
        tfds = pytest.importorskip("tensorflow_datasets")

        class TinyPairs(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                    "premise": tfds.features.Text(), "hypothesis": tfds.features.Text(),
                    "label": tfds.features.ClassLabel(names=["entailment", "not_entailment"]),
                    "idx": np.int32}))

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples(10), "validation": self._generate_examples(4)}

            def _generate_examples(self, n):
                for i in range(n):
                    yield i, {"premise": f"premise number {i}.", "hypothesis": f"hypothesis {i}",
                              "label": i % 2, "idx": i}

        d = tmp_path_factory.mktemp("tfds")
        TinyPairs(data_dir=str(d), file_format="array_record").download_and_prepare()
        return str(d)

    def test_tfds_task_loads_without_tensorflow(self, tfds_dir):
        task = tfds_task("tiny_pairs", data_dir=tfds_dir)
        assert task.label_names == ("entailment", "not_entailment")
        assert set(task.splits) == {"train", "validation"}
        assert set(task.text_fields) == {"premise", "hypothesis"}
        ex = task.load("train")
        assert len(ex) == 10
        by_idx = {e["idx"]: e for e in ex}
        assert by_idx[3] == {"premise": "premise number 3.", "hypothesis": "hypothesis 3", "label": 1,
                             "idx": 3}
        assert "tensorflow" not in sys.modules
        same = get_task(f"tfds:tiny_pairs@{tfds_dir}")
        assert [e["idx"] for e in same.load("validation")] == [e["idx"] for e in task.load("validation")]

    def test_tfds_errors(self, tfds_dir):
        with pytest.raises(DataError, match="no label feature 'gold'"):
            tfds_task("tiny_pairs", data_dir=tfds_dir, label_field="gold")
        with pytest.raises(DataError, match="no split 'test'"):
            tfds_task("tiny_pairs", data_dir=tfds_dir).load("test")


def test_register_task_in_default_registry(tmp_path):
    from peft_jax.data import register_task
    p = _write(tmp_path / "d.jsonl", '{"q": "is it?", "a": "yes", "y": 1.5}\n')
    task = task_from_config({"name": "test-only-regression", "files": {"train": p}, "text_fields": ["q", "a"],
                             "label_field": "y", "kind": "regression"})
    register_task(task, overwrite=True)
    assert get_task("test-only-regression") is task and "test-only-regression" in list_tasks()
    assert task.load("train") == [{"q": "is it?", "a": "yes", "label": 1.5, "idx": 0}]
    with pytest.raises(DataError, match="already registered"):
        register_task(task)


def test_verbalizer_as_list_per_class(tmp_path):
    p = _write(tmp_path / "d.tsv", "good\tpos\nbad\tneg\n")
    cfg = {"name": "t", "files": {"train": p}, "columns": ["text", "label"], "text_fields": ["text"],
           "label_names": ["neg", "pos"], "template": "{text} It was {mask}.",
           "verbalizer": [["terrible", "bad"], ["great"]]}
    assert task_from_config(cfg).verbalizer == [["terrible", "bad"], ["great"]]
    with pytest.raises(DataError, match="verbalizer has 1 entries for 2 classes"):
        task_from_config({**cfg, "verbalizer": [["great"]]})
