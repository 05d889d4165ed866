"""Per-op profile of one training step, peft_jax (XLA:CPU) vs PyTorch, by op category.

Same setup as ``step_bench.py`` (the prepared folder of ``prepare.py``, the same fixed
batch, method hyper-parameters and AdamW; ``jax_worker.setup`` / ``torch_worker.build``).
Each framework runs in its own subprocess: after ``--warmup`` steps it profiles
``--steps`` steps and reports milliseconds per step by op category:

* torch: ``torch.profiler.profile`` (CPU activity), ``key_averages()``, *self* CPU time
  of every op (so nothing is counted twice), mapped to a category by the op name
  (``aten::addmm`` -> matmul, ``aten::native_layer_norm_backward`` -> layernorm, ...).
* jax: ``jax.profiler.trace`` with ``XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true``,
  which makes the XLA:CPU thunk executor emit one trace event per thunk (``args.hlo_op``
  = the HLO instruction: ``ynn_fusion.3``, ``loop_multiply_fusion.12``, ``copy.4``, ...).
  An op's time runs from its event's start to the later of the event's end and its
  ``end: <op>`` completion event (async thunks, e.g. dots on the Eigen pool, complete
  there). The optimized HLO (``--xla_dump_to``, the step module's
  ``*after_optimizations.txt``) maps each thunk to the instructions inside it and their
  source frames (file / function of the JAX code that emitted them): a thunk holding a
  dot is a matmul; otherwise the instructions vote by source (optax -> optimizer,
  ``dropout_keep_mask`` / ``hash_bits`` -> dropout, ``softmax``, ``LayerNorm``,
  ``gelu``) or, without such a source, by opcode (reduce -> reductions, copy / transpose
  / broadcast / slice -> copies, arithmetic -> elementwise). ``guard+metrics`` (jax only):
  ``train_step``'s finite check, update-ratio / grad-norm metrics and the ``lax.cond``
  that keeps or replaces the state (it copies the state); the non-matmul ops whose
  innermost source is ``dot_product_attention`` (scale, mask add, softmax) are
  ``softmax``.

Limits: a fused XLA kernel gets ONE category (e.g. a backward fusion of the GELU
gradient with a dropout mask goes to the category with most instructions in it),
torch's fused ``scaled_dot_product_attention`` kernels (BERT's default ``sdpa``
attention) hold QK^T, softmax and PV in one op and get their own row ``sdpa attention``;
both columns are wall time on the dispatching thread (intra-op threads included).
``sum of ops`` vs ``step wall`` shows the time outside ops (dispatch, waits, Python).

    python benchmarks/op_profile.py --model minilm --methods full,adapter,lora \\
        --out benchmarks/results/op_profile_minilm.txt

``--quick``: tiny random configs, batch 4 x seq 32, 1 profiled step (smoke test).
"""

from __future__ import annotations

import argparse
import bisect
import collections
import glob
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

CATEGORIES = ["matmul", "sdpa attention", "softmax", "layernorm", "gelu/activation",
              "dropout/rng", "elementwise", "reductions", "copies/transposes", "optimizer",
              "guard+metrics", "other"]

# ----------------------------------------------------------------------------- torch names

_TORCH = [
    ("matmul", r"^aten::(mm|addmm|bmm|baddbmm|linear|matmul|_addmm_activation|dot|mv|addmv|einsum)$"),
    ("sdpa attention", r"^aten::(_?scaled_dot_product|_scaled_dot_product).*"),
    ("softmax", r"^aten::(_?softmax|_safe_softmax|_softmax_backward_data)$"),
    ("layernorm", r"^aten::(native_)?layer_norm(_backward)?$|rms_norm"),
    ("gelu/activation", r"^aten::(gelu|gelu_backward|relu_?|threshold_backward|tanh|"
                        r"tanh_backward|silu|silu_backward|sigmoid|sigmoid_backward)$"),
    ("dropout/rng", r"^aten::(native_dropout|native_dropout_backward|dropout|bernoulli_?|"
                    r"uniform_|rand|rand_like|empty_like_bernoulli)$"),
    ("optimizer", r"^aten::(_fused_adamw?_|_foreach_.*|lerp_?|addcdiv_?|addcmul_?)$|^Optimizer\."),
    ("reductions", r"^aten::(sum|mean|max|min|amax|amin|argmax|norm|var|std|any|all)$"),
    ("copies/transposes", r"^aten::(copy_|clone|contiguous|t|transpose|permute|view|reshape|"
                          r"_unsafe_view|expand|as_strided|_to_copy|to|cat|stack|slice|select|"
                          r"unsqueeze|squeeze|flatten|split|chunk|narrow|_reshape_alias|"
                          r"detach|alias|unbind|expand_as|view_as|index_select|narrow_copy)$"),
    ("elementwise", r"^aten::(add|add_|mul|mul_|div|div_|sub|sub_|rsub|where|masked_fill_?|"
                    r"fill_|zero_|zeros|zeros_like|ones|ones_like|neg|pow|sqrt|rsqrt|exp|log|"
                    r"eq|ne|lt|le|gt|ge|abs|clamp|clamp_|maximum|minimum|bitwise_.*|"
                    r"logical_.*|sign|reciprocal|square|__and__|__or__|scalar_tensor)$"),
]
_TORCH_RE = [(c, re.compile(p)) for c, p in _TORCH]


def torch_category(name: str) -> str:
    for cat, rx in _TORCH_RE:
        if rx.search(name):
            return cat
    return "other"


# ----------------------------------------------------------------------------- HLO parsing

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"(?:^|[\s}\]])([a-z][a-z0-9\-]*)\(")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition|branch_computations)=\{?([%\w.\-, ]+)\}?")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")

KEYWORDS = [  # (category, regex on "file:function" frames and the op_name metadata)
    ("optimizer", re.compile(r"optax|peft_jax/peft/optim\.py|apply_updates|adam", re.I)),
    ("guard+metrics", re.compile(r"update_ratio|_max_abs|global_norm|tree_norm|tree_sum|"
                                r"all_finite|is_finite", re.I)),
    ("dropout/rng", re.compile(r"dropout|hash_bits|_fmix32|coordinate_code|threefry|"
                               r"random_bits|bernoulli|jax/_src/random|prng|_uniform|"
                               r"iota_2x32|random_split|fold_in", re.I)),
    ("softmax", re.compile(r"softmax|:dot_product_attention$", re.I)),
    ("layernorm", re.compile(r"layernorm|layer_norm|rms_?norm", re.I)),
    ("gelu/activation", re.compile(r"gelu|relu|silu|sigmoid|swish|get_activation", re.I)),
]
NO_VOTE = {"broadcast", "reshape", "slice", "iota", "convert"}  # glue inside a fusion
TRIVIAL = {"parameter", "constant", "bitcast", "tuple", "get-tuple-element", "after-all",
           "partition-id", "replica-id"}
COPY_OPS = {"copy", "transpose", "broadcast", "reshape", "slice", "concatenate", "pad",
            "dynamic-slice", "dynamic-update-slice", "reverse", "iota", "copy-start",
            "copy-done"}
MATMUL_OPS = {"dot", "convolution"}


def parse_hlo(text: str) -> dict:
    """Optimized HLO text -> {instructions, computations, frames}.

    instructions: name -> (opcode, [called computations], op_name, stack_frame_id);
    computations: name -> [instruction names]; frames: stack_frame_id -> ["file:function",
    ... innermost first]."""
    tables: dict[str, dict[int, str]] = {}
    section = None
    instrs, comps = {}, {}
    cur = None
    for line in text.splitlines():
        s = line.strip()
        if s in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = s
            tables[s] = {}
            continue
        if section and s and re.match(r"^\d+ ", s):
            k, _, v = s.partition(" ")
            tables[section][int(k)] = v
            continue
        section = None
        if not s:
            continue
        m = _COMP.match(s)
        if m and "=" not in s.split("{")[0].split("(")[0]:
            cur = m.group(1)
            comps[cur] = []
            continue
        if s == "}":
            cur = None
            continue
        m = _INSTR.match(s)
        if not m or cur is None:
            continue
        name, rest = m.group(1), m.group(2)
        om = _OPCODE.search(rest)
        opcode = om.group(1) if om else "?"
        called = []
        for cm in _CALLS.finditer(rest):
            called += [c.strip().lstrip("%") for c in cm.group(1).split(",") if c.strip()]
        opn = re.search(r'op_name="([^"]*)"', rest)
        sf = re.search(r"stack_frame_id=(\d+)", rest)
        ct = re.search(r'custom_call_target="([^"]*)"', rest)
        if ct:
            opcode = opcode + ":" + ct.group(1)
        instrs[name] = (opcode, called, opn.group(1) if opn else "", int(sf.group(1)) if sf else 0)
        comps[cur].append(name)
    # stack frames -> "file:function" chains
    files = {k: v.strip('"') for k, v in tables.get("FileNames", {}).items()}
    funcs = {k: v.strip('"') for k, v in tables.get("FunctionNames", {}).items()}
    locs = {}
    for k, v in tables.get("FileLocations", {}).items():
        fm, fn = re.search(r"file_name_id=(\d+)", v), re.search(r"function_name_id=(\d+)", v)
        locs[k] = f"{files.get(int(fm.group(1)), '?') if fm else '?'}:" \
                  f"{funcs.get(int(fn.group(1)), '?') if fn else '?'}"
    raw = {}
    for k, v in tables.get("StackFrames", {}).items():
        fl, pa = re.search(r"file_location_id=(\d+)", v), re.search(r"parent_frame_id=(\d+)", v)
        raw[k] = (int(fl.group(1)) if fl else 0, int(pa.group(1)) if pa else 0)
    frames = {}
    for k in raw:
        chain, seen, f = [], set(), k
        while f in raw and f not in seen:
            seen.add(f)
            loc, parent = raw[f]
            chain.append(locs.get(loc, "?"))
            f = parent
        frames[k] = chain
    return {"instructions": instrs, "computations": comps, "frames": frames}


def _inner(hlo: dict, name: str) -> list[str]:
    """All instructions of ``name`` and the computations it calls (recursively)."""
    out, todo, seen = [name], list(hlo["instructions"].get(name, ("", [], "", 0))[1]), set()
    while todo:
        c = todo.pop()
        if c in seen:
            continue
        seen.add(c)
        for i in hlo["computations"].get(c, []):
            out.append(i)
            todo += hlo["instructions"][i][1]
    return out


def _keyword_category(hlo: dict, instr: str):
    opcode, _, op_name, sf = hlo["instructions"][instr]
    for frame in hlo["frames"].get(sf, []):  # innermost first
        for cat, rx in KEYWORDS:
            if rx.search(frame):
                return cat
    for cat, rx in KEYWORDS:
        if rx.search(op_name):
            return cat
    return None


def _opcode_class(op: str) -> str:
    base = op.split(":")[0]
    if base in MATMUL_OPS:
        return "matmul"
    if base in ("reduce", "reduce-window", "all-reduce"):
        return "reductions"
    if base in COPY_OPS:
        return "copies/transposes"
    if base in ("rng", "rng-bit-generator", "rng-get-and-update-state"):
        return "dropout/rng"
    if base in ("gather", "scatter", "sort", "while", "conditional", "call", "custom-call",
                "fusion", "?"):
        return "other"
    return "elementwise"


def hlo_category(hlo: dict, thunk: str) -> str:
    """Category of one thunk (an instruction of the entry or a nested computation)."""
    if thunk not in hlo["instructions"]:
        base = re.sub(r"\.\d+$", "", thunk)
        return "matmul" if "dot" in base else _opcode_class(base.split("_")[0])
    opcode, _, op_name, _ = hlo["instructions"][thunk]
    if opcode == "conditional" and re.search(r"train_step\)/cond$", op_name):
        return "guard+metrics"  # train_step's skip-if-not-finite lax.cond (copies the state)
    members = [i for i in _inner(hlo, thunk) if hlo["instructions"][i][0] not in TRIVIAL]
    ops = [hlo["instructions"][i][0] for i in members]
    if any(o.split(":")[0] in MATMUL_OPS or re.search(r"matmul|dot|onednn|gemm", o, re.I)
           for o in ops if ":" in o or o.split(":")[0] in MATMUL_OPS):
        return "matmul"
    votes = collections.Counter()
    for i in members:
        op = hlo["instructions"][i][0].split(":")[0]
        if op in ("fusion", "call", "while", "conditional") or op in NO_VOTE:
            continue
        kw = _keyword_category(hlo, i)
        if op in COPY_OPS and kw not in ("optimizer", "guard+metrics", "dropout/rng"):
            kw = None  # a transpose / copy inside attention or a norm is still a copy
        votes[kw or _opcode_class(op)] += 1
    if not votes:
        ops = {o.split(":")[0] for o in ops}
        return "copies/transposes" if ops and ops <= COPY_OPS | NO_VOTE else \
            _opcode_class(hlo["instructions"][thunk][0])
    kw = [c for c, _ in votes.most_common() if c in dict(KEYWORDS)]
    if kw and votes[kw[0]] * 3 >= sum(votes.values()):
        return kw[0]  # a kernel that is mostly (>= 1/3) one source function
    for cls in ("reductions", "elementwise", "copies/transposes", "dropout/rng", "other"):
        if votes.get(cls):
            return cls
    return votes.most_common(1)[0][0]


# ----------------------------------------------------------------------------- trace parsing


def thunk_times(trace_file: str, module: str = "") -> tuple[dict, str]:
    """{hlo_op: (total microseconds, count)} of the XLA:CPU thunk events of the busiest
    module (or ``module``), and that module's name."""
    with gzip.open(trace_file) if trace_file.endswith(".gz") else open(trace_file) as f:
        tr = json.load(f)
    ev = tr["traceEvents"] if isinstance(tr, dict) else tr
    thunks, ends = [], collections.defaultdict(list)
    for e in ev:
        if e.get("ph") != "X":
            continue
        a = e.get("args") or {}
        if "hlo_op" in a and "hlo_module" in a:
            thunks.append(e)
        elif e["name"].startswith("end: "):
            ends[e["name"][5:]].append(float(e["ts"]))
    for v in ends.values():
        v.sort()
    per_mod = collections.Counter()
    for e in thunks:
        per_mod[e["args"]["hlo_module"]] += float(e.get("dur", 0))
    if not per_mod:
        return {}, ""
    module = module or per_mod.most_common(1)[0][0]
    thunks = sorted((e for e in thunks if e["args"]["hlo_module"] == module),
                    key=lambda e: (e["tid"], float(e["ts"])))
    out = collections.defaultdict(lambda: [0.0, 0])
    # nested thunks (while / call bodies) count in the innermost only: self time
    stack: list = []
    spans = []
    for e in thunks:
        ts, dur = float(e["ts"]), float(e.get("dur", 0))
        name = e["args"]["hlo_op"]
        end_list = ends.get(name, [])
        j = bisect.bisect_left(end_list, ts)
        done = ts + dur
        if j < len(end_list) and end_list[j] - done < 1e5:  # completion within 100 ms
            done = max(done, end_list[j])
        spans.append([e["tid"], ts, ts + dur, done - ts, name])
    for tid, ts, te, d, name in spans:
        while stack and (stack[-1][0] != tid or stack[-1][2] <= ts):
            stack.pop()
        if stack and te <= stack[-1][2]:
            stack[-1][3] -= (te - ts)  # parent's self time
        rec = [tid, ts, te, d, name]
        stack.append(rec)
        out[name][1] += 1
    for tid, ts, te, d, name in spans:
        out[name][0] += max(d, 0.0)
    return {k: tuple(v) for k, v in out.items()}, module


def find_hlo_dump(dump_dir: str, module: str) -> str:
    cands = [p for p in glob.glob(os.path.join(dump_dir, "*after_optimizations.txt"))
             if f".{module}." in os.path.basename(p)]
    if not cands:
        raise FileNotFoundError(f"no optimized HLO dump of {module} in {dump_dir}")
    return max(cands, key=os.path.getsize)


# ----------------------------------------------------------------------------- workers


def _summarize(ops: dict, steps: int, step_ms: float, cat_of) -> dict:
    cats = collections.Counter()
    rows = []
    for name, (us, count) in ops.items():
        c = cat_of(name)
        cats[c] += us / 1e3 / steps
        rows.append(dict(op=name, cat=c, ms=us / 1e3 / steps, calls=count / steps))
    rows.sort(key=lambda r: -r["ms"])
    return dict(cats=dict(cats), ops_ms=sum(cats.values()), step_ms=step_ms, top=rows[:10],
                n_ops=len(rows))


def jax_worker(a) -> dict:
    import jax

    import jax_worker as jw
    import prepare as prep

    jw.configure_jax("threefry2x32", "")
    hp = common.MethodHParams()
    spec = prep.load_spec(a.folder)
    host = jw.fixed_batch(a.folder, a.batch, a.seq, spec["pad_id"])
    pre, state, frozen, step, info = jw.setup(a.folder, a.method, hp, False, "none", host)
    batch, frozen, state = jax.device_put(host), jax.device_put(frozen), jax.device_put(state)
    state, metrics, _ = common.timed_steps(step, state, frozen, batch, a.warmup)
    trace_dir = os.path.join(a.work, "trace")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        state, metrics, times = common.timed_steps(step, state, frozen, batch, a.steps)
    files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True) or \
        glob.glob(os.path.join(trace_dir, "**", "*.json.gz"), recursive=True)
    if not files:
        raise RuntimeError(f"no trace JSON under {trace_dir}")
    ops, module = thunk_times(max(files, key=os.path.getmtime))
    if not ops:
        raise RuntimeError("no XLA:CPU thunk events in the trace (is "
                           "--xla_cpu_enable_xprof_traceme=true in XLA_FLAGS?)")
    with open(find_hlo_dump(os.path.join(a.work, "hlo"), module)) as f:
        hlo = parse_hlo(f.read())
    res = _summarize(ops, a.steps, 1e3 * common.median(times), lambda n: hlo_category(hlo, n))
    return dict(res, framework="jax", method=a.method, module=module,
                loss=float(metrics["loss"]))


def torch_worker(a) -> dict:
    import torch

    import torch_worker as tw

    _, _, model, _, opt, batch = tw.step_setup(a)
    for _ in range(a.warmup):
        tw.train_step(model, opt, batch, False)
    times = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(a.steps):
            t0 = time.perf_counter()
            loss = tw.train_step(model, opt, batch, False)
            times.append(time.perf_counter() - t0)
    ops = {e.key: (float(e.self_cpu_time_total), int(e.count)) for e in prof.key_averages()
           if e.self_cpu_time_total > 0}
    res = _summarize(ops, a.steps, 1e3 * common.median(times), torch_category)
    return dict(res, framework="torch", method=a.method, loss=float(loss))


def run_worker(fw: str, folder: str, method: str, a, work: str) -> dict:
    args = ["--worker", fw, "--folder", folder, "--method", method, "--batch", str(a.batch),
            "--seq", str(a.seq), "--steps", str(a.steps), "--warmup", str(a.warmup),
            "--threads", str(a.threads), "--work", work]
    env = common.worker_env()
    if fw == "jax":
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
                            f" --xla_dump_to={os.path.join(work, 'hlo')}"
                            " --xla_dump_hlo_as_text").strip()
    cmd = [sys.executable, os.path.abspath(__file__)] + args
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {a.timeout:.0f}s"}
    res = common.parse_result(proc.stdout)
    if res is None:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {proc.returncode}: {tail[:200]}"}
    return res


# ----------------------------------------------------------------------------- report


def table(results: dict, methods: list[str]) -> str:
    rows = []
    for m in methods:
        j, t = results[(m, "jax")], results[(m, "torch")]
        cats = [c for c in CATEGORIES
                if (j.get("cats", {}).get(c, 0) > 0 or t.get("cats", {}).get(c, 0) > 0)]
        for c in cats + ["sum of ops", "step wall"]:
            key = {"sum of ops": "ops_ms", "step wall": "step_ms"}.get(c)
            jv = j.get(key) if key else j.get("cats", {}).get(c, 0.0)
            tv = t.get(key) if key else t.get("cats", {}).get(c, 0.0)
            rows.append(dict(method=m, category=c, jax=jv, torch=tv,
                             ratio=(jv / tv if jv is not None and tv else None)))
    return common.format_table(rows, [("method", "method", ""), ("category", "category", ""),
                                      ("jax", "jax ms/step", ".2f"),
                                      ("torch", "torch ms/step", ".2f"),
                                      ("ratio", "jax/torch", ".2f")])


def top_table(res: dict) -> str:
    return common.format_table(res.get("top", []), [
        ("op", "op", ""), ("cat", "category", ""), ("ms", "ms/step", ".2f"),
        ("calls", "calls/step", ".0f")])


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "(uptime unavailable)"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="minilm", choices=common.MODELS)
    p.add_argument("--methods", default="full,adapter")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="profiled steps")
    p.add_argument("--warmup", type=int, default=2, help="steps before profiling (incl. compile)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--quick", action="store_true", help="tiny random configs, 1 profiled step")
    p.add_argument("--out", default="", help="also write the report to this file")
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "peft_jax_bench"))
    p.add_argument("--data-dir", default=common.DEFAULT_DATA)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per worker run")
    p.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        fn = jax_worker if a.worker == "jax" else torch_worker
        common.run_guarded(lambda: fn(a), framework=a.worker, method=a.method)
        return
    if a.quick:
        a.batch, a.seq, a.steps, a.warmup = 4, 32, 1, 1
        a.cache_dir = os.path.join(a.cache_dir, "quick")
    methods = [m for m in a.methods.split(",") if m]
    bad = [m for m in methods if m not in common.METHODS]
    if bad:
        p.error(f"--methods: unknown {bad}; known: {list(common.METHODS)}")
    import step_bench

    folder = os.path.join(a.cache_dir, a.model)
    step_bench.ensure_prepared(a.model, folder, max(a.batch, 64), a.quick, a.data_dir)
    load = uptime()
    t0 = time.time()
    results = {}
    with tempfile.TemporaryDirectory(prefix="op_profile_") as tmp:
        for m in methods:
            for fw in ("jax", "torch"):
                work = os.path.join(tmp, f"{m}_{fw}")
                os.makedirs(work, exist_ok=True)
                r = run_worker(fw, folder, m, a, work)
                results[(m, fw)] = r
                print(f"[{time.time() - t0:5.0f}s] {m} {fw}: "
                      + (f"{r['step_ms']:.1f} ms/step" if "step_ms" in r else r.get("error", "")),
                      file=sys.stderr, flush=True)
    out = [f"op profile: {a.model} | batch {a.batch} x seq {a.seq} | fp32 | "
           f"{a.steps} profiled steps after {a.warmup} warm-up | torch threads {a.threads}"
           + (" | QUICK (tiny random configs)" if a.quick else ""),
           f"load at start: {load}",
           "jax: XLA:CPU thunk events (--xla_cpu_enable_xprof_traceme), categorised via the "
           "optimized HLO; torch: profiler self CPU time per aten op. ms per step.",
           "", table(results, methods)]
    for m in methods:
        for fw in ("jax", "torch"):
            r = results[(m, fw)]
            out += ["", f"top 10 ops: {m} / {fw}"
                    + (f" (of {r['n_ops']} distinct ops)" if "n_ops" in r else "")]
            out.append(top_table(r) if not r.get("error") else f"ERROR: {r['error']}")
    text = "\n".join(out)
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
