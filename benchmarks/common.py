"""Shared pieces of the benchmark scripts: data, method hyper-parameters, FLOP counts,
RSS, timing statistics and the result table. Imports neither JAX nor PyTorch, so both
workers (``jax_worker.py``, ``torch_worker.py``) can use it without inflating each
other's memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import resource
import subprocess
import sys
from typing import Any, Iterable, Optional, Sequence

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data", "sst2")
MODELS = ("minilm", "smollm2")
METHODS = ("full", "lora", "prompt", "prefix", "adapter", "ia3")


@dataclasses.dataclass(frozen=True)
class MethodHParams:
    """Hyper-parameters shared by both frameworks (so both train the same thing)."""

    lora_r: int = 8
    lora_alpha: float = 16.0
    num_virtual_tokens: int = 20   # prompt tuning and prefix tuning
    adapter_dim: int = 64          # bottleneck of the adapters (after attention and FFN)
    learning_rate: float = 1e-3    # AdamW, no weight decay, betas (0.9, 0.999), eps 1e-8

    def lora_targets(self, kind: str) -> tuple[str, ...]:
        """Query and value projections (our names / HF names)."""
        return ("q_proj", "v_proj") if kind == "decoder" else ("query", "value")

    def ia3_targets(self, kind: str):
        """HF module names IA3 scales: keys, values, the FFN down projection."""
        return (["k_proj", "v_proj", "down_proj"] if kind == "decoder" else
                r".*layer\.\d+\.(attention\.self\.(key|value)|output\.dense)")

    def ia3_feedforward(self, kind: str):
        """The FFN modules among them (scaled at their input)."""
        return ["down_proj"] if kind == "decoder" else r".*layer\.\d+\.output\.dense"


# ----------------------------------------------------------------------------- processes


def worker_env() -> dict:
    """The environment of a worker subprocess: offline, CPU JAX, no tokenizer threads."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def run_script(script: str, args: list, timeout: float) -> dict:
    """Run ``benchmarks/<script>`` in its own process (``worker_env``); its ``RESULT`` line,
    or ``{"error": ...}`` (timeout, or the last stderr line of a worker that printed none)."""
    cmd = [sys.executable, os.path.join(HERE, script)] + list(args)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=worker_env())
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    res = parse_result(proc.stdout)
    if res is None:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {proc.returncode}: {tail[:160]}"}
    return res


# ----------------------------------------------------------------------------- data


def read_sst2(data_dir: str = DEFAULT_DATA, split: str = "train") -> tuple[list[str], np.ndarray]:
    """SST-2 ``sentence<TAB>label`` file -> (sentences, labels [n] int32)."""
    path = os.path.join(data_dir, f"sentiment-{split}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SST-2 file not found: {path} (pass --data-dir)")
    sents, labels = [], []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            line = line.rstrip("\n")
            if not line:
                continue
            text, _, lab = line.rpartition("\t")
            if not text or lab not in ("0", "1"):
                raise ValueError(f"{path}:{i + 1}: expected 'sentence<TAB>0|1', got {line[:60]!r}")
            sents.append(text.strip())
            labels.append(int(lab))
    return sents, np.asarray(labels, np.int32)


def example_id(label: int, tokens: Sequence[int]) -> str:
    """Content id of one encoded example (sha1 of its label and token ids): the same in
    every framework when both saw the same text, label and tokenization."""
    h = hashlib.sha1(str(int(label)).encode())
    h.update(np.asarray(tokens, np.int64).tobytes())
    return h.hexdigest()[:16]


def synthetic_token_ids(n: int, vocab: int, seed: int = 0, pad_id: int = 0,
                        low: int = 3, high: int = 40) -> list[list[int]]:
    """Random token sequences (``--quick``: no tokenizer), lengths uniform in [low, high]."""
    rng = np.random.default_rng(seed)
    ids = []
    for _ in range(n):
        length = int(rng.integers(low, high + 1))
        row = rng.integers(0, vocab, size=length)
        row[row == pad_id] = (pad_id + 1) % vocab
        ids.append(row.astype(np.int32).tolist())
    return ids


def pad_batch(rows: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad / truncate token rows -> (input_ids [b, length] int32, attention_mask [b, length])."""
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        r = list(r)[:length]
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask


# ----------------------------------------------------------------------------- FLOPs


def step_flops(spec: dict, method: str, hp: MethodHParams, batch: int, seq: int,
               real_tokens: Optional[int] = None) -> float:
    """Analytic matmul FLOPs of one training step (2*m*k*n per matmul; element-wise ops,
    softmax, norms and the optimizer are not counted).

    ``FLOPs = forward + backward-data + backward-weight(trainable only)`` with
    ``backward-data = forward`` and ``backward-weight`` = the forward FLOPs of the
    trainable matmuls (all dense layers for full fine-tuning; LoRA factors and adapters
    otherwise; the frozen base has no weight gradients). Prompt tuning lengthens the
    sequence by P; prefix tuning lengthens the keys by P. ``spec``: from
    ``prepare.model_spec`` (kind, d, layers, heads, kv_heads, head_dim, d_ff, vocab, tied,
    num_labels). ``seq``: padded length; every position is computed.
    """
    d, n_layers = spec["d"], spec["layers"]
    h, hkv, dh, f = spec["heads"], spec["kv_heads"], spec["head_dim"], spec["d_ff"]
    decoder = spec["kind"] == "decoder"
    p_prompt = hp.num_virtual_tokens if method == "prompt" else 0
    p_prefix = hp.num_virtual_tokens if method == "prefix" else 0
    lq = seq + p_prompt
    lk = lq + p_prefix
    t = batch * lq
    dense_per_token = 2 * (2 * d * h * dh + 2 * d * hkv * dh + (3 if decoder else 2) * d * f)
    attn = 2 * 2 * batch * lq * lk * h * dh
    fwd_body = n_layers * (t * dense_per_token + attn)
    if decoder:
        head = 2 * t * d * spec["vocab"]
    else:
        head = 2 * batch * d * d + 2 * batch * d * spec["num_labels"]
    extra = 0.0  # forward FLOPs of the PEFT matmuls
    if method == "lora":
        out_q, out_v = h * dh, hkv * dh
        extra = n_layers * 2 * t * hp.lora_r * ((d + out_q) + (d + out_v))
    elif method == "adapter":
        extra = n_layers * 2 * (2 * t * 2 * d * hp.adapter_dim)
    fwd = fwd_body + head + extra
    if method == "full":
        bwd_weight = n_layers * t * dense_per_token + head
    else:
        bwd_weight = extra + (0 if decoder else 2 * batch * d * spec["num_labels"])
    return float(fwd + fwd + bwd_weight)


FLOP_FORMULA = ("FLOPs/step = fwd + bwd_data(=fwd) + bwd_weight(trainable matmuls only); "
                "matmuls only (2mkn), incl. attention QK^T/PV and the LM head or pooler+classifier")


# ----------------------------------------------------------------------------- stats


def timed_steps(step, state, frozen, batch, n: int):
    """Call a jitted train step ``n`` times on one batch; returns ``(state, metrics, times)``
    with each call's seconds (waiting for the new state and metrics)."""
    import jax
    times = []
    metrics = None
    for _ in range(n):
        t0 = time.perf_counter()
        state, metrics = step(state, frozen, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    return state, metrics, times


def peak_rss_mb() -> float:
    """Peak resident set size of this process (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def median(xs: Iterable[float]) -> float:
    return float(np.median(np.asarray(list(xs), np.float64)))


def emit(result: dict) -> None:
    """Workers print their result as the last stdout line, prefixed for the parent."""
    print("RESULT " + json.dumps(result), flush=True)


def run_guarded(fn, **identity) -> None:
    """Emit ``fn()``; an exception becomes a result row with ``error`` (the traceback goes
    to stderr) so that one unsupported combination does not abort the whole table."""
    import traceback

    try:
        result = fn()
    except Exception as e:  # reported in the table, not hidden
        traceback.print_exc()
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        result = dict(identity, error=f"{type(e).__name__}: {msg}"[:160])
    emit(result)


def parse_result(stdout: str) -> Optional[dict]:
    for line in reversed(stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return None


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Plain-text table. columns: (key, header, format spec); missing values print '-'."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        line = []
        for key, _, fmt in columns:
            v = r.get(key)
            if v is None or (isinstance(v, float) and not np.isfinite(v)):
                line.append("-")
            else:
                line.append(format(v, fmt) if fmt else str(v))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    out = []
    for j, c in enumerate(cells):
        out.append("  ".join(s.rjust(w) if i > 1 else s.ljust(w) for i, (s, w) in enumerate(zip(c, widths))))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
