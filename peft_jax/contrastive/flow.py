"""BERT-flow (Li et al. 2020): a normalizing flow fitted on sentence embeddings, used as a
post-processor beside whitening.

The flow ``f`` maps an embedding ``x [d]`` to ``z = f(x)`` with a standard-normal prior and is
fitted by maximum likelihood, ``log p(x) = log N(f(x); 0, I) + log |det df/dx|``, on unlabelled
embeddings (the encoder stays frozen, as in BERT-flow). Cosine similarity is then taken
between the ``z``. Glow-style steps (Kingma & Dhariwal 2018) on vectors:

- ActNorm: ``(x + b) * exp(s)``, initialized from the data to zero mean / unit variance;
- invertible linear map (Glow's 1x1 convolution) in LU form ``W = P L (U + diag(sign * exp(v)))``,
  ``log|det W| = sum(v)``;
- affine coupling: ``x = [x1, x2]``, ``(s, t) = MLP(x1)``, ``y2 = x2 * exp(tanh(s)) + t``
  (the last MLP layer starts at zero, so every coupling starts as the identity).

:meth:`Flow.inverse` undoes :meth:`Flow.__call__` exactly (up to float error).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax.scipy.linalg import solve_triangular

Array = Any
LOG_2PI = float(np.log(2 * np.pi))


class ActNorm(nn.Module):
    """``y = (x + b) * exp(s)``; ``b, s`` initialized so the init batch has zero mean and
    unit variance per dimension."""

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Array]:
        b = self.param("bias", lambda _: -jnp.mean(x, 0))
        s = self.param("log_scale", lambda _: -jnp.log(jnp.std(x, 0) + 1e-6))
        return (x + b) * jnp.exp(s), jnp.broadcast_to(jnp.sum(s), x.shape[:1])

    def inverse(self, y: Array) -> Array:
        b, s = self.get_variable("params", "bias"), self.get_variable("params", "log_scale")
        return y * jnp.exp(-s) - b


@functools.lru_cache(maxsize=16)
def _lu_init(d: int, seed: int) -> dict:
    """LU factors of a seeded random orthogonal ``[d, d]`` matrix (numpy)."""
    import scipy.linalg
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    p, low, up = scipy.linalg.lu(q)
    diag = np.diag(up)
    return {"perm": p.astype(np.float32), "lower": low.astype(np.float32),
            "upper": np.triu(up, 1).astype(np.float32), "sign": np.sign(diag).astype(np.float32),
            "log_diag": np.log(np.abs(diag)).astype(np.float32)}


class InvLinear(nn.Module):
    """``y = x @ W.T`` with ``W = P L (U + diag(sign * exp(v)))`` (L unit lower, U strictly
    upper triangular; ``P`` and ``sign`` fixed; the start is a random rotation from ``seed``)."""

    seed: int = 0

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Array]:
        d = x.shape[-1]
        init = _lu_init(d, self.seed)
        self.variable("flow_const", "perm", lambda: jnp.asarray(init["perm"]))
        self.variable("flow_const", "sign", lambda: jnp.asarray(init["sign"]))
        self.param("lower", lambda _: jnp.asarray(init["lower"]))
        self.param("upper", lambda _: jnp.asarray(init["upper"]))
        self.param("log_diag", lambda _: jnp.asarray(init["log_diag"]))
        p, low, up = self._factors()
        w = p @ low @ up
        v = self.get_variable("params", "log_diag")
        return x @ w.T, jnp.broadcast_to(jnp.sum(v), x.shape[:1])

    def _factors(self) -> tuple[Array, Array, Array]:
        d = self.get_variable("params", "lower").shape[0]
        low = jnp.tril(self.get_variable("params", "lower"), -1) + jnp.eye(d)
        sign = self.get_variable("flow_const", "sign")
        up = jnp.triu(self.get_variable("params", "upper"), 1) + jnp.diag(
            sign * jnp.exp(self.get_variable("params", "log_diag")))
        return self.get_variable("flow_const", "perm"), low, up

    def inverse(self, y: Array) -> Array:
        p, low, up = self._factors()
        a = p.T @ y.T                                           # L U x^T = P^T y^T
        b = solve_triangular(low, a, lower=True, unit_diagonal=True)
        return solve_triangular(up, b, lower=False).T


class Coupling(nn.Module):
    """Affine coupling on ``[n, dim]``: the first ``dim // 2`` dims give scale and shift of
    the rest through an MLP."""

    dim: int
    hidden: int = 256

    def setup(self):
        self.half = self.dim // 2
        self.net_in = nn.Dense(self.hidden)
        self.net_mid = nn.Dense(self.hidden)
        self.net_out = nn.Dense(2 * (self.dim - self.half), kernel_init=nn.initializers.zeros)

    def _scale_shift(self, x1: Array) -> tuple[Array, Array]:
        out = self.net_out(nn.relu(self.net_mid(nn.relu(self.net_in(x1)))))
        d2 = self.dim - self.half
        return jnp.tanh(out[..., :d2]), out[..., d2:]

    def __call__(self, x: Array) -> tuple[Array, Array]:
        x1, x2 = x[..., :self.half], x[..., self.half:]
        s, t = self._scale_shift(x1)
        return jnp.concatenate([x1, x2 * jnp.exp(s) + t], -1), jnp.sum(s, -1)

    def inverse(self, y: Array) -> Array:
        y1, y2 = y[..., :self.half], y[..., self.half:]
        s, t = self._scale_shift(y1)
        return jnp.concatenate([y1, (y2 - t) * jnp.exp(-s)], -1)


class Flow(nn.Module):
    """``depth`` Glow steps (ActNorm -> invertible linear -> affine coupling) on ``[n, dim]``.

    ``__call__(x) -> (z [n, dim], logdet [n])``; ``inverse(z) -> x``."""

    dim: int
    depth: int = 4
    hidden: int = 256

    def setup(self):
        self.steps = [(ActNorm(name=f"actnorm_{i}"), InvLinear(seed=i, name=f"linear_{i}"),
                       Coupling(self.dim, self.hidden, name=f"coupling_{i}"))
                      for i in range(self.depth)]

    def __call__(self, x: Array) -> tuple[Array, Array]:
        logdet = jnp.zeros(x.shape[:1], jnp.float32)
        for layers in self.steps:
            for layer in layers:
                x, ld = layer(x)
                logdet = logdet + ld
        return x, logdet

    def inverse(self, z: Array) -> Array:
        for layers in reversed(self.steps):
            for layer in reversed(layers):
                z = layer.inverse(z)
        return z


def log_likelihood(z: Array, logdet: Array) -> Array:
    """``log N(z; 0, I) + logdet`` per row ``[n]``."""
    return -0.5 * jnp.sum(z * z, -1) - 0.5 * z.shape[-1] * LOG_2PI + logdet


@dataclasses.dataclass
class FlowPost:
    """A fitted flow: ``post(x [n, d]) -> z [n, d]`` (float32)."""

    variables: dict
    dim: int
    depth: int
    hidden: int

    def __post_init__(self):
        self.flow = Flow(self.dim, self.depth, self.hidden)
        self._fwd = jax.jit(lambda v, x: self.flow.apply(v, x)[0])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self._fwd(self.variables, jnp.asarray(x, jnp.float32)))

    def inverse(self, z: np.ndarray) -> np.ndarray:
        return np.asarray(self.flow.apply(self.variables, jnp.asarray(z, jnp.float32),
                                          method=Flow.inverse))

    def nll(self, x: np.ndarray) -> float:
        """Mean negative log-likelihood per dimension (nats)."""
        z, ld = self.flow.apply(self.variables, jnp.asarray(x, jnp.float32))
        return float(-jnp.mean(log_likelihood(z, ld)) / x.shape[-1])


def fit_flow(embeddings: np.ndarray, steps: int = 300, depth: int = 4, hidden: int = 256,
             lr: float = 1e-3, batch_size: int = 256, seed: int = 0,
             log_every: int = 0) -> FlowPost:
    """Fit a :class:`Flow` on ``embeddings [n, d]`` by maximum likelihood (Adam, minibatches
    of ``batch_size`` rows; ActNorm initialized on the first ``batch_size`` rows)."""
    x = np.asarray(embeddings, np.float32)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 2:
        raise ValueError(f"fit_flow: embeddings must be [n >= 2, d >= 2], got {x.shape}")
    flow = Flow(x.shape[1], depth, hidden)
    rng = np.random.default_rng(seed)
    init_rows = x[rng.permutation(len(x))[:batch_size]]
    variables = flow.init(jax.random.PRNGKey(seed), jnp.asarray(init_rows))
    params, const = variables["params"], {k: v for k, v in variables.items() if k != "params"}
    tx = optax.adam(lr)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, xb):
        def nll(p):
            z, ld = flow.apply({"params": p, **const}, xb)
            return -jnp.mean(log_likelihood(z, ld)) / xb.shape[-1]
        loss, g = jax.value_and_grad(nll)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    n = len(x)
    bs = min(batch_size, n)
    for i in range(steps):
        rows = rng.choice(n, bs, replace=False)
        params, opt, loss = step(params, opt, jnp.asarray(x[rows]))
        if log_every and (i + 1) % log_every == 0:
            print(f"[flow] step {i + 1}: nll/dim {float(loss):.4f}", flush=True)
    return FlowPost({"params": params, **const}, x.shape[1], depth, hidden)


def save_flow(path: str, post: FlowPost) -> None:
    """``.npz`` of the flattened variables plus the architecture (no pickle)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    flat = traverse_util.flatten_dict(jax.device_get(post.variables), sep="/")
    meta = json.dumps({"dim": post.dim, "depth": post.depth, "hidden": post.hidden})
    np.savez(path, __meta__=np.asarray(meta), **{k: np.asarray(v) for k, v in flat.items()})


def load_flow(path: str) -> FlowPost:
    """Read a file written by :func:`save_flow`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: flow file not found")
    with np.load(path, allow_pickle=False) as f:
        if "__meta__" not in f.files:
            raise ValueError(f"{path}: not a flow file (no __meta__ array)")
        meta = json.loads(str(f["__meta__"]))
        flat = {k: jnp.asarray(f[k]) for k in f.files if k != "__meta__"}
    return FlowPost(traverse_util.unflatten_dict(flat, sep="/"), int(meta["dim"]),
                    int(meta["depth"]), int(meta["hidden"]))


def apply_post(post: Optional[Any], x: np.ndarray) -> np.ndarray:
    """``post(x)`` (a :class:`FlowPost` or a whitening) or ``x`` when ``post`` is None."""
    return x if post is None else np.asarray(post(x), np.float32)
