"""Linear (kernel-trick) attention: elu+1, relu and FAVOR+ feature maps, chunked causal form, recurrent decoding.

A feature map ``φ: R^H -> R^D`` (non-negative) replaces the softmax kernel ``exp(q·k)`` by ``φ(q)·φ(k)``::

    out_i = Σ_j φ(q_i)·φ(k_j) v_j / Σ_j φ(q_i)·φ(k_j)          over the keys j that query i sees.

The weights factorise, so by associativity ``out_i = φ(q_i)ᵀ (Σ_j φ(k_j) v_jᵀ) / φ(q_i)ᵀ (Σ_j φ(k_j))``
(Katharopoulos et al. 2020, "Transformers are RNNs").

* **Non-causal**: one ``[D, Hv]`` summary ``Σ_j φ(k_j) v_jᵀ`` and ``z = Σ_j φ(k_j)`` per (batch, kv head):
  O((T + S)·D·Hv) time and O((T + S)·(D + Hv)) memory. Plain autodiff: what it saves is the size of the features.
* **Causal, chunked parallel form**: the sequence is cut into chunks of C positions; inside a chunk a quadratic
  form, across chunks a carried ``D x (Hv+1)`` state (the sum over all earlier chunks; the denominator rides along
  as an all-ones value column): O(T·C·D + T·D·Hv) time, one state alive at a time. The backward is a
  ``custom_vjp`` made of the same chunked sums (a forward pass for dQ, a time-reversed one for dK and dV). It saves
  only the features and values (FAVOR+: also the output and one log-normaliser per row) -- no per-step or
  per-chunk state is stored, so forward + backward memory grows linearly in T.
* **Recurrent decoding**: :func:`linear_attention_step` adds one key/value to the state and attends with one
  query, O(D·Hv) per token; :func:`init_state` makes the empty state. The state is kept in float32 (float64 for
  float64) whatever the input dtype.

Keys that no query sees (at or past ``key_value_seq_lengths``; with ``is_causal`` also keys past the last query)
are replaced by zeros with a select before anything reads them, so garbage there (NaN, Inf) never reaches an
output or a gradient, and their gradient is exactly zero. GQA: query head n uses kv head ``n // (N // K)``; kv
features and states are never repeated. ``is_causal`` is top-left aligned as in ``jax.nn`` (query i sees keys
``j <= i``, also when T != S). Features, sums and the division run in float32 (float64 for float64 inputs); the
output has the input dtype. The value head dim Hv may differ from H.

**Empty rows and non-finite input.** With non-negative features the output is a convex combination of the visible
values. A row that sees no key, or whose weights are all exactly zero (relu features that never overlap), returns
**zeros with zero gradient**, like a fully masked row in softmax attention. A NaN or Inf that a row sees (in its
query, a visible key or a visible value) makes that row's output non-finite; it never reaches rows that do not
see it (in the causal form values are read through a select and rows that see a non-finite value are flagged,
never ``0 * NaN``).

**Feature maps.** ``"elu"``: ``elu(x) + 1``; ``"relu"``: ``max(x, 0)`` (D = H, no scaling of the inputs).
``"taylor"`` (Based, Arora et al. 2024): the 2nd-order Taylor expansion of the softmax kernel,
``φ(q)·φ(k) = 1 + s + s²/2`` with ``s = q·k/√H``, from ``φ(x) = [1, x̃, x̃_a x̃_b (a < b), x̃_a²/√2]``,
``x̃ = x / H^(1/4)``: D = 1 + H + H(H+1)/2 features (153 for H = 16, Based's feature dimension), always positive
(``1 + s + s²/2 >= 1/2``), so every row's weights are positive and the normaliser never vanishes.
:func:`favor_feature_map` (Performer FAVOR+, Choromanski et al. 2020) with ``x̃ = x / H^(1/4)``::

    φ(x) = exp(e(x)) / √M,   e(x) = W x̃ − ‖x̃‖²/2,     E_W[φ(q)·φ(k)] = exp(q·k / √H)   (the default softmax kernel),

``W`` [M, H]: Gaussian rows, by default orthogonal within blocks of H (QR of a Gaussian matrix, sign-fixed so that
it is Haar) and rescaled by the norms of independent Gaussian vectors, so each row is still N(0, I) (unbiased) with
lower variance. Redraw by building the map with a new PRNG key. Any other callable ``f(x [..., H]) -> [..., D]`` is
used as a symmetric feature map (queries and keys alike).

**FAVOR+ stabilisation (exact).** The raw features ``exp(e)`` of inputs of size 10 in H = 16 are around
``exp(-200)``: they underflow float32, and so does any single shift shared by all features (the Performer's
per-query-row and global key maxima), which then silently zeroes rows whose true weights are positive. Here a
ratio's pair weights ``exp(e_m(q_i) + e_m(k_j))`` are only ever formed relative to that row's largest visible pair:

* keys are shifted **per feature** ``m`` by ``c_m = max_j e_m(k_j)`` over the keys the sum runs over, and the
  query absorbs it: ``q̂_im = exp(e_m(q_i) + c_m − b_i)`` with ``b_i = max_m (e_m(q_i) + c_m)``. When every key of
  the sum is visible to row i, ``b_i`` *is* the row's largest pair exponent, both factors are ``<= 1`` and the
  largest pair weight is exactly 1, so the denominator is ``>= 1``: what float32 drops is below ``tiny`` relative
  to it. Non-causal attention uses this directly (``c`` over all valid keys).
* **causal**: only sums over keys that every row of the sum sees are formed. The carried state uses running
  per-feature maxima (rescaled when they grow, as decoding does); inside a chunk (rounded up to a power of two) the
  keys ``j < i`` are split dyadically: at level l, query block ``2a+1`` of size ``2^l`` sees all of key block
  ``2a``, which gets its own per-feature shift; the diagonal pair ``(i, i)`` is summed over features directly.
  Every partial sum is taken relative to the row's overall maximum ``b_i`` (the largest of its partial maxima),
  so the parts add without rescaling: O(C·M·log C) exponentials and O(C²·(M + Hv)) matmul work per chunk.
* the backward recomputes ``p_ijm = exp(e_m(q_i) + e_m(k_j) − λ_i)`` (``λ_i`` the row's log-normaliser, saved by
  the forward) the same way: blockwise for the chunk, and for later chunks a time-reversed state with running
  per-feature maxima of ``e_m(q_i) − λ_i``.
* decoding keeps a running per-feature maximum of the key exponents (``LinearAttentionState.log_scale``).

Every shift is shared by everything one ratio sums, so it cancels exactly; its gradient is stopped, which is exact
for the same reason. Only the float32 rounding of the exponents (about ``|e|·2^-24``) remains.

Decayed (RetNet, GLA) and delta-rule (DeltaNet) linear attention live in :mod:`attention_jax.linear_rnn` and are
re-exported here: :func:`decayed_linear_attention`, :func:`delta_rule_attention`, their ``*_reference`` and
``*_step`` functions.

The semantics every function shares (layout, masks, residual, dtypes) are in docs/DESIGN.md.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attention_jax import _autodiff, _numerics, _tiling, core


# Chunk length of the causal form, by measurement: causal fwd + bwd, float32, B = N = 1, H = 64, T = 16384, on the
# shared 2-core CPU (min over 12 interleaved runs): elu (D = 64) C = 32 / 64 / 128 / 256 -> 200 / 182 / 192 / 269 ms.
# FAVOR+ (D = 256, the exact dyadic form; min over 6 interleaved runs, CPU shared with other jobs):
# C = 8 / 16 / 32 / 64 / 128 -> 1055 / 892 / 745 / 564 / 611 ms. 64 is the best for both.
DEFAULT_CHUNK_SIZE = 64


# ----------------------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------------------


def _int_arg(fn: str, name: str, value, minimum: int = 1) -> int:
  """``value`` as a Python int ``>= minimum`` (bools, floats and strings are refused with a ``ValueError``)."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
    kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
    raise ValueError(f"{fn}: {name} must be {kind}; got {name}={value!r}")
  return int(value)


def _check_chunk_size(chunk_size) -> int:
  if chunk_size is None:
    return DEFAULT_CHUNK_SIZE
  if isinstance(chunk_size, (bool, np.bool_)) or not isinstance(chunk_size, (int, np.integer)) or chunk_size <= 0:
    raise ValueError(f"chunk_size must be a positive int (or None for {DEFAULT_CHUNK_SIZE}); got {chunk_size!r}")
  return int(chunk_size)


def _check_float_arrays(fn: str, **arrays: jax.Array) -> None:
  """Real floating point of one dtype, or a ``ValueError`` naming the arrays' dtypes and shapes."""
  described = " ".join(f"{n}.shape={x.shape} {n}.dtype={x.dtype}" for n, x in arrays.items())
  for name, x in arrays.items():
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{fn}: {name} must be a real floating-point array (linear attention of integer, boolean "
                       f"or complex inputs is not defined); got {described}")
  if len({x.dtype for x in arrays.values()}) > 1:
    raise ValueError(f"{fn}: inputs must share one dtype; got {described}")


# ----------------------------------------------------------------------------------------------------------
# Feature maps
# ----------------------------------------------------------------------------------------------------------


def _elu_plus_one(x: jax.Array) -> jax.Array:
  return jax.nn.elu(x) + 1.0


def _relu(x: jax.Array) -> jax.Array:
  return jax.nn.relu(x)


def _taylor(x: jax.Array) -> jax.Array:
  """``[1, x̃, x̃_a x̃_b (a < b), x̃_a² / √2]`` with ``x̃ = x / H^(1/4)``: ``φ(q)·φ(k) = 1 + s + s²/2``,
  ``s = q·k / √H`` (the 2nd-order Taylor expansion of ``exp(s)``; D = 1 + H + H(H+1)/2)."""
  H = x.shape[-1]
  x = x * (H ** -0.25)
  a, b = np.triu_indices(H)
  weight = np.where(a == b, 0.5 ** 0.5, 1.0).astype(np.dtype(x.dtype)).reshape((1,) * (x.ndim - 1) + (-1,))
  second = x[..., a] * x[..., b] * weight
  return jnp.concatenate([jnp.ones_like(x[..., :1]), x, second], axis=-1)


@functools.partial(jax.tree_util.register_dataclass, data_fields=[], meta_fields=["name", "fn"])
@dataclasses.dataclass(frozen=True)
class ElementwiseFeatureMap:
  """``φ(x) = fn(x)`` for queries and keys alike, no stabiliser (elu+1, relu, or a user callable)."""
  name: str
  fn: Callable[[jax.Array], jax.Array]

  def __call__(self, x: jax.typing.ArrayLike) -> jax.Array:
    x = jnp.asarray(x)
    cd = _numerics.compute_dtype(x.dtype)
    return self.fn(x.astype(cd)).astype(cd)

  def num_features(self, head_dim: int) -> int:
    return jax.eval_shape(self, jax.ShapeDtypeStruct((head_dim,), jnp.float32)).shape[-1]


elu_feature_map = ElementwiseFeatureMap("elu", _elu_plus_one)
relu_feature_map = ElementwiseFeatureMap("relu", _relu)
taylor_feature_map = ElementwiseFeatureMap("taylor", _taylor)
FEATURE_MAPS = {"elu": elu_feature_map, "relu": relu_feature_map, "taylor": taylor_feature_map}


@functools.partial(jax.tree_util.register_dataclass, data_fields=["projection"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class FavorFeatureMap:
  """Performer FAVOR+ positive random features; build with :func:`favor_feature_map`."""
  projection: jax.Array   # [M, H]: the random directions w_m, one per row

  @property
  def head_dim(self) -> int:
    return self.projection.shape[1]

  def num_features(self, head_dim: int | None = None) -> int:
    del head_dim
    return self.projection.shape[0]

  def exponents(self, x: jax.typing.ArrayLike) -> jax.Array:
    """``W x̃ − ‖x̃‖²/2`` with ``x̃ = x / H^(1/4)``: ``[..., H] -> [..., M]``, the log of ``√M·φ(x)``."""
    x = jnp.asarray(x)
    cd = _numerics.compute_dtype(x.dtype)
    M, H = self.projection.shape
    x = x.astype(cd) * (H ** -0.25)
    # A 2-D matmul: XLA:CPU runs dots with many (even size-1) batch dims about 2x slower.
    wx = jnp.matmul(x.reshape(-1, H), self.projection.astype(cd).T, precision=_numerics.matmul_precision(cd))
    return wx.reshape(x.shape[:-1] + (M,)) - 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)

  def __call__(self, x: jax.typing.ArrayLike) -> jax.Array:
    """The raw (unstabilised) features ``exp(W x̃ − ‖x̃‖²/2) / √M``: ``φ(q)·φ(k)`` estimates ``exp(q·k/√H)``."""
    return jnp.exp(self.exponents(x)) * (self.num_features() ** -0.5)


FeatureMap = ElementwiseFeatureMap | FavorFeatureMap


def favor_feature_map(rng: jax.Array, head_dim: int, num_features: int = 256, orthogonal: bool = True
                      ) -> FavorFeatureMap:
  """Performer FAVOR+ positive random features for heads of size ``head_dim`` (see the module docstring).

  ``orthogonal``: rows orthogonal within each block of ``head_dim`` (lower variance); else i.i.d. Gaussian rows.
  A new ``rng`` draws new features. Pure and jit-able (``head_dim``, ``num_features`` static Python ints).
  """
  head_dim = _int_arg("favor_feature_map", "head_dim", head_dim)
  num_features = _int_arg("favor_feature_map", "num_features", num_features)
  if not isinstance(orthogonal, (bool, np.bool_)):
    raise ValueError(f"favor_feature_map: orthogonal must be a bool; got {orthogonal!r}")
  return FavorFeatureMap(_favor_projection(rng, head_dim, num_features, bool(orthogonal)))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _favor_projection(rng: jax.Array, head_dim: int, num_features: int, orthogonal: bool) -> jax.Array:
  dir_rng, norm_rng = jax.random.split(rng)
  if not orthogonal:
    return jax.random.normal(dir_rng, (num_features, head_dim), jnp.float32)
  blocks = _tiling.cdiv(num_features, head_dim)
  q_XHH, r_XHH = jnp.linalg.qr(jax.random.normal(dir_rng, (blocks, head_dim, head_dim), jnp.float32))
  # Q·diag(sign(diag R)) is Haar-distributed (Mezzadri 2007), so each row of W has a uniform direction.
  sign_XH = jnp.where(jnp.diagonal(r_XHH, axis1=-2, axis2=-1) < 0, -1.0, 1.0)
  directions = jnp.swapaxes(q_XHH * sign_XH[:, None, :], -1, -2).reshape(blocks * head_dim, head_dim)
  norms = jnp.linalg.norm(jax.random.normal(norm_rng, (num_features, head_dim), jnp.float32), axis=-1)
  return directions[:num_features] * norms[:, None]


def get_feature_map(feature_map: Any, head_dim: int) -> FeatureMap:
  """``"elu"``, ``"relu"``, ``"taylor"``, a map from this module or any callable -> a feature map (``ValueError``
  otherwise)."""
  if isinstance(feature_map, str):
    if feature_map not in FEATURE_MAPS:
      raise ValueError(f"unknown feature_map={feature_map!r}; choose one of {tuple(FEATURE_MAPS)}, "
                       "favor_feature_map(...) or a callable")
    return FEATURE_MAPS[feature_map]
  if isinstance(feature_map, FavorFeatureMap):
    if feature_map.projection.ndim != 2 or feature_map.head_dim != head_dim:
      raise ValueError(f"the FAVOR+ feature map was built for head_dim={feature_map.projection.shape[-1]} "
                       f"(projection.shape={feature_map.projection.shape}), but the inputs have H={head_dim}")
    return feature_map
  if isinstance(feature_map, ElementwiseFeatureMap):
    return feature_map
  if callable(feature_map):
    return ElementwiseFeatureMap(getattr(feature_map, "__name__", "custom"), feature_map)
  raise ValueError(f"feature_map must be 'elu', 'relu', 'taylor' or a callable; got {feature_map!r}")


def _elementwise_features(fmap: ElementwiseFeatureMap, q, k):
  """``φ(q) [..., D]`` and ``φ(k) [..., D]`` in the compute dtype, checking that the map is ``[..., H] -> [..., D]``."""
  phi_q, phi_k = fmap(q), fmap(k)
  if (phi_q.shape[:-1] != q.shape[:-1] or phi_k.shape[:-1] != k.shape[:-1] or phi_q.ndim != q.ndim
      or phi_q.shape[-1] != phi_k.shape[-1]):
    raise ValueError(f"feature map must map [..., H] -> [..., D] alike for queries and keys; got {q.shape} -> "
                     f"{phi_q.shape}, {k.shape} -> {phi_k.shape}")
  return phi_q, phi_k


# ----------------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------------


def _neg_inf_to_zero(x: jax.Array) -> jax.Array:
  """A shift that may be ``-inf`` (nothing to shift) -> 0, so ``x - shift`` stays ``-inf`` and never NaN."""
  return jnp.where(jnp.isneginf(x), jnp.zeros_like(x), x)


def _ratio(num: jax.Array, den: jax.Array) -> jax.Array:
  """``num [..., E] / den [...]``. ``den == 0`` (no weight) gives zeros (NaN where ``num`` is NaN) with zero
  gradient; a NaN ``den`` propagates. Both are divided by ``stop_gradient(den)`` first, so the gradient
  ``-num/den²`` stays finite down to ``den ~ tiny``."""
  den = den[..., None]
  empty = den == 0
  scale = lax.stop_gradient(jnp.where(empty | ~jnp.isfinite(den) | (jnp.abs(den) < jnp.finfo(den.dtype).tiny),
                                      jnp.ones_like(den), den))
  inv = 1 / scale
  out = (num * inv) / jnp.where(empty, jnp.ones_like(den), den * inv)
  return jnp.where(empty, jnp.where(jnp.isnan(num), num, jnp.zeros_like(num)), out)


def _seen_keys(B: int, S: int, T: int, kv_lengths, is_causal: bool) -> jax.Array | None:
  """Bool ``[B, S]``: keys some query sees (before the length; causal: also before T). None if all are seen."""
  limit = None
  if is_causal and S > T:
    limit = jnp.full((B,), T, jnp.int32)
  if kv_lengths is not None:
    limit = kv_lengths if limit is None else jnp.minimum(limit, kv_lengths)
  if limit is None:
    return None
  return jnp.arange(S, dtype=jnp.int32)[None, :] < limit[:, None]


def _kv_head_major(query, key, value, seen_BS):
  """``q [X, T, G, H]``, ``k [X, S, H]``, ``v [X, S, Hv]`` (X = B*K), unseen keys and values selected to zero,
  and ``seen [X, S]`` (or None)."""
  B, T, N, H = query.shape
  S, K, Hv = key.shape[1], key.shape[2], value.shape[3]
  q = jnp.transpose(query.reshape(B, T, K, N // K, H), (0, 2, 1, 3, 4)).reshape(B * K, T, N // K, H)
  k = jnp.transpose(key, (0, 2, 1, 3)).reshape(B * K, S, H)
  v = jnp.transpose(value, (0, 2, 1, 3)).reshape(B * K, S, Hv)
  if seen_BS is None:
    return q, k, v, None
  seen = jnp.broadcast_to(seen_BS[:, None, :], (B, K, S)).reshape(B * K, S)
  k = jnp.where(seen[:, :, None], k, jnp.zeros_like(k))
  v = jnp.where(seen[:, :, None], v, jnp.zeros_like(v))
  return q, k, v, seen


def _token_major(y_XTGE: jax.Array, B: int) -> jax.Array:
  """``[B*K, T, G, E] -> [B, T, K*G, E]``."""
  X, T, G, E = y_XTGE.shape
  K = X // B
  return jnp.transpose(y_XTGE.reshape(B, K, T, G, E), (0, 2, 1, 3, 4)).reshape(B, T, K * G, E)


def _with_ones(v_XSE: jax.Array, dtype) -> jax.Array:
  """Values with an all-ones column appended: the denominator rides along with the numerator."""
  v = v_XSE.astype(dtype)
  return jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), dtype)], axis=-1)


def _initial_carry(*values: jax.Array):
  """A scan's initial state behind an optimization barrier. When a scan runs once, XLA inlines its body and the
  state becomes a constant; XLA:CPU's YNNPACK fusions (jax 0.11-0.12) have been seen to return garbage (NaN) for
  a dot with such a broadcast-constant operand. The barrier keeps it an ordinary buffer."""
  return lax.optimization_barrier(values)


# ----------------------------------------------------------------------------------------------------------
# Elementwise feature maps: the chunked causal product and its backward
# ----------------------------------------------------------------------------------------------------------


def _chunked_causal_product(q, k, v, chunk: int, precision):
  """``y[i, g] = Σ_{j <= i, g'} (q[i, g]·k[j, g']) v[j, g']`` chunk by chunk, carrying ``Σ kᵀv`` between chunks.

  ``q [X, L, Gq, F]``, ``k [X, L, Gk, F]``, ``v [X, L, Gk, E]`` -> ``y [X, L, Gq, E]`` (X = batch x kv heads);
  ``L % chunk == 0``. The heads ``g`` of either side share their kv head's sums (GQA in both directions).
  Inside a chunk the values are read through a select (``0 * NaN`` would leak a later value into an earlier row);
  rows that see a non-finite value are set to NaN. Everything is a 3-D batched matmul: XLA:CPU runs those about
  twice as fast as ones with more batch dims.
  """
  X, L, Gq, F = q.shape
  Gk, E = k.shape[2], v.shape[-1]
  n = L // chunk

  def split(x):   # [X, L, G, d] -> [n, X, chunk * G, d]
    g, d = x.shape[2], x.shape[3]
    return jnp.moveaxis(x.reshape(X, n, chunk * g, d), 1, 0)

  rows = np.arange(chunk * Gq) // Gq
  cols = np.arange(chunk * Gk) // Gk
  causal_1MN = jnp.asarray(cols[None, :] <= rows[:, None])[None]

  def body(state_XFE, xs):
    q_c, k_c, v_c = xs
    s_XMN = jnp.einsum("xmf,xnf->xmn", q_c, k_c, precision=precision)
    s_XMN = jnp.where(causal_1MN, s_XMN, jnp.zeros_like(s_XMN))
    finite_XN = _numerics.finite_rows(v_c)
    v_clean = jnp.where(finite_XN[:, :, None], v_c, jnp.zeros_like(v_c))
    bad_XM = jnp.any(causal_1MN & ~finite_XN[:, None, :], axis=-1)
    y = (jnp.einsum("xmn,xne->xme", s_XMN, v_clean, precision=precision) +
         jnp.einsum("xmf,xfe->xme", q_c, state_XFE, precision=precision))
    y = jnp.where(bad_XM[:, :, None], jnp.full_like(y, jnp.nan), y)
    return state_XFE + jnp.einsum("xnf,xne->xfe", k_c, v_c, precision=precision), y

  _, y = lax.scan(body, _initial_carry(jnp.zeros((X, F, E), q.dtype))[0], (split(q), split(k), split(v)))
  return jnp.moveaxis(y, 0, 1).reshape(X, L, Gq, E)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _causal_product(chunk: int, precision, q, k, v):
  return _chunked_causal_product(q, k, v, chunk, precision)


def _causal_product_fwd(chunk, precision, q, k, v):
  return _chunked_causal_product(q, k, v, chunk, precision), (q, k, v)


def _causal_product_bwd(chunk, precision, res, dy):
  """dQ_i = Σ_{j<=i} (dy_i·v_j) k_j; dK_j = Σ_{i>=j} (v_j·dy_i) q_i; dV_j = Σ_{i>=j} (k_j·q_i) dy_i."""
  q, k, v = res
  flip = functools.partial(jnp.flip, axis=1)
  dq = _chunked_causal_product(dy, v, k, chunk, precision)
  dk = flip(_chunked_causal_product(flip(v), flip(dy), flip(q), chunk, precision))
  dv = flip(_chunked_causal_product(flip(k), flip(q), flip(dy), chunk, precision))
  return dq, dk, dv


_causal_product.defvjp(_causal_product_fwd, _causal_product_bwd)


def _elementwise_causal(phi_q_XTGF, phi_k_XSF, va_XSE, chunk: int, precision) -> jax.Array:
  """Causal numerators ``[X, T, G, E]`` (values carry the ones column) by the chunked product."""
  T, S = phi_q_XTGF.shape[1], phi_k_XSF.shape[1]
  length = max(T, S)          # positions past S are zero keys; rows past T are dropped
  chunk = min(chunk, length)
  L = _numerics.round_up(length, chunk)
  q = _numerics.pad_axis(phi_q_XTGF, 1, L)
  k, v = _numerics.pad_axis(phi_k_XSF, 1, L)[:, :, None], _numerics.pad_axis(va_XSE, 1, L)[:, :, None]
  return _causal_product(chunk, precision, q, k, v)[:, :T]


# ----------------------------------------------------------------------------------------------------------
# FAVOR+: exact stabilised sums (see the module docstring)
# ----------------------------------------------------------------------------------------------------------


def _favor_noncausal(eq_XTGM, ek_XSM, va_XSE, precision):
  """Numerators ``[X, T, G, E]`` and denominators ``[X, T, G]`` (``>= 1`` on rows with keys), one per-feature key
  shift over all keys (every key is visible to every row). Plain autodiff."""
  X, T, G, M = eq_XTGM.shape
  c_XM = lax.stop_gradient(jnp.max(ek_XSM, axis=1))
  kf_XSM = jnp.exp(ek_XSM - _neg_inf_to_zero(c_XM)[:, None, :])
  kv_XME = jnp.einsum("xsm,xse->xme", kf_XSM, va_XSE, precision=precision)
  t_XTGM = eq_XTGM + c_XM[:, None, None, :]
  b_XTG = lax.stop_gradient(jnp.max(t_XTGM, axis=-1))
  qf = jnp.exp(t_XTGM - _neg_inf_to_zero(b_XTG)[..., None]).reshape(X, T * G, M)
  y = jnp.einsum("xrm,xme->xre", qf, kv_XME, precision=precision).reshape(X, T, G, -1)
  return y[..., :-1], y[..., -1]


def _block_sizes(chunk: int) -> list[int]:
  """Dyadic levels of a power-of-two chunk: 1, 2, 4, ..., chunk/2."""
  return [1 << level for level in range(chunk.bit_length() - 1)]


def _halves(x: jax.Array, size: int) -> jax.Array:
  """``[X, C, ...] -> [X, C/(2 size), 2, size, ...]``: [:, :, 0] are key blocks, [:, :, 1] the query blocks that
  see them."""
  X, C = x.shape[:2]
  return x.reshape((X, C // (2 * size), 2, size) + x.shape[2:])


def _interleave(first: jax.Array | None, second: jax.Array | None) -> jax.Array:
  """Inverse of :func:`_halves` (a missing half is zeros): ``[X, nb, size, ...] x 2 -> [X, C, ...]``."""
  like = first if first is not None else second
  first = jnp.zeros_like(like) if first is None else first
  second = jnp.zeros_like(like) if second is None else second
  X, nb, size = like.shape[:3]
  return jnp.stack([first, second], axis=2).reshape((X, nb * 2 * size) + like.shape[3:])


def _favor_chunk_blocks(eq_XCGM, ek_XCM):
  """Per dyadic level: ``(size, key exponents [X, nb, size, M], key shift c [X, nb, M], query exponents plus
  shift t [X, nb, size, G, M])``."""
  blocks = []
  for size in _block_sizes(ek_XCM.shape[1]):
    kh = _halves(ek_XCM, size)[:, :, 0]
    c = jnp.max(kh, axis=2)
    t = _halves(eq_XCGM, size)[:, :, 1] + c[:, :, None, None, :]
    blocks.append((size, kh, c, t))
  return blocks


def _favor_chunk_forward(state_XME, s_XM, eq_XCGM, ek_XCM, va_XCE, precision):
  """One chunk of the exact causal FAVOR+ sums: (numerators and denominators ``[X, C, G, E]``, row shifts
  ``b [X, C, G]``). ``state`` holds the earlier keys relative to their per-feature running maxima ``s``."""
  X, C, G, M = eq_XCGM.shape
  E = va_XCE.shape[-1]
  t_state = eq_XCGM + s_XM[:, None, None, :]
  t_diag = eq_XCGM + ek_XCM[:, :, None, :]
  b = jnp.maximum(jnp.max(t_state, axis=-1), jnp.max(t_diag, axis=-1))         # [X, C, G]
  blocks = _favor_chunk_blocks(eq_XCGM, ek_XCM)
  for size, _, _, t in blocks:
    bh = _halves(b, size)
    b = _interleave(bh[:, :, 0], jnp.maximum(bh[:, :, 1], jnp.max(t, axis=-1)))
  b_safe = _neg_inf_to_zero(b)
  qf0 = jnp.exp(t_state - b_safe[..., None]).reshape(X, C * G, M)
  y = jnp.einsum("xrm,xme->xre", qf0, state_XME, precision=precision).reshape(X, C, G, E)
  y = y + jnp.sum(jnp.exp(t_diag - b_safe[..., None]), axis=-1)[..., None] * va_XCE[:, :, None, :]
  for size, kh, c, t in blocks:
    nb = C // (2 * size)
    kf = jnp.exp(kh - _neg_inf_to_zero(c)[:, :, None, :]).reshape(X * nb, size, M)
    qf = jnp.exp(t - _halves(b_safe, size)[:, :, 1][..., None]).reshape(X * nb, size * G, M)
    p = jnp.einsum("xrm,xcm->xrc", qf, kf, precision=precision)
    vh = _halves(va_XCE, size)[:, :, 0].reshape(X * nb, size, E)
    yh = jnp.einsum("xrc,xce->xre", p, vh, precision=precision).reshape(X, nb, size, G, E)
    y = y + _interleave(None, yh)
  return y, b


def _favor_state_update(state_XME, s_XM, ek_XCM, va_XCE, precision):
  """Adds a chunk's keys to the state, rescaling it when a per-feature maximum grows."""
  s_new = jnp.maximum(s_XM, jnp.max(ek_XCM, axis=1))
  s_safe = _neg_inf_to_zero(s_new)
  kf = jnp.exp(ek_XCM - s_safe[:, None, :])
  state = state_XME * jnp.exp(s_XM - s_safe)[:, :, None] + jnp.einsum("xcm,xce->xme", kf, va_XCE,
                                                                      precision=precision)
  return state, s_new


def _split_chunks(x: jax.Array, chunk: int) -> jax.Array:
  """``[X, L, ...] -> [L/chunk, X, chunk, ...]``."""
  X, L = x.shape[:2]
  return jnp.moveaxis(x.reshape((X, L // chunk, chunk) + x.shape[2:]), 1, 0)


def _merge_chunks(x: jax.Array) -> jax.Array:
  """Inverse of :func:`_split_chunks`."""
  n, X, C = x.shape[:3]
  return jnp.moveaxis(x, 0, 1).reshape((X, n * C) + x.shape[3:])


def _favor_causal_forward(chunk: int, precision, eq, ek, va):
  """``out [X, L, G, E-1]`` and the rows' log-normalisers ``λ [X, L, G]`` (``-inf`` on rows without weight)."""
  X, L, G, M = eq.shape
  E = va.shape[-1]

  def body(carry, xs):
    state, s = carry
    eq_c, ek_c, va_c = xs
    y, b = _favor_chunk_forward(state, s, eq_c, ek_c, va_c, precision)
    den = y[..., -1]
    lam = jnp.where(jnp.isneginf(b), b, b + jnp.log(den))
    return _favor_state_update(state, s, ek_c, va_c, precision), (_ratio(y[..., :-1], den), lam)

  init = _initial_carry(jnp.zeros((X, M, E), eq.dtype), jnp.full((X, M), -jnp.inf, eq.dtype))
  _, (out, lam) = lax.scan(body, init, (_split_chunks(eq, chunk), _split_chunks(ek, chunk),
                                        _split_chunks(va, chunk)))
  return _merge_chunks(out), _merge_chunks(lam)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _favor_causal(num_rows: int, chunk: int, precision, eq, ek, va):
  """Causal FAVOR+ attention from exponents: ``eq [X, L, G, M]``, ``ek [X, L, M]`` (``-inf``: no key),
  ``va [X, L, E]`` (values and the ones column) -> ``out [X, L, G, E-1]``. Rows ``>= num_rows`` are padding."""
  return _favor_causal_forward(chunk, precision, eq, ek, va)[0]


def _favor_causal_fwd(num_rows, chunk, precision, eq, ek, va):
  out, lam = _favor_causal_forward(chunk, precision, eq, ek, va)
  return out, (eq, ek, va, out, lam)


def _favor_causal_bwd(num_rows, chunk, precision, res, dout):
  """With ``p_ijm = exp(e_m(q_i) + e_m(k_j) − λ_i)`` and ``g_i = [dy_i, −dy_i·out_i]`` (so that
  ``dy_i·(v_j − out_i) = g_i·va_j``): ``dva_j = Σ_i (Σ_m p_ijm) g_i``, ``deq_im = Σ_j p_ijm g_i·va_j``,
  ``dek_jm = Σ_i p_ijm g_i·va_j`` over visible pairs. A forward scan does the chunk-internal pairs and dQ from the
  state; a reverse scan brings dK, dV from later chunks."""
  eq, ek, va, out, lam = res
  X, L, G, M = eq.shape
  E = va.shape[-1]
  live = (jnp.arange(L) < num_rows)[None, :, None] & ~jnp.isneginf(lam)          # [X, L, G]
  delta = jnp.sum(dout * out, axis=-1)
  g = jnp.where(live[..., None], jnp.concatenate([dout, -delta[..., None]], axis=-1), 0)
  lam = jnp.where(live, lam, 0)

  def pair_weights(t, lam_, live_):   # exp(t - λ) on live rows, 0 elsewhere (never evaluated as inf * 0)
    return jnp.where(live_[..., None], jnp.exp(jnp.where(live_[..., None], t - lam_[..., None], -jnp.inf)), 0)

  def forward_body(carry, xs):
    state, s = carry
    eq_c, ek_c, va_c, g_c, lam_c, live_c = xs
    C = eq_c.shape[1]
    qf0 = pair_weights(eq_c + s[:, None, None, :], lam_c, live_c).reshape(X, C * G, M)
    g_state = jnp.einsum("xre,xme->xrm", g_c.reshape(X, C * G, E), state, precision=precision)
    deq = (qf0 * g_state).reshape(X, C, G, M)
    pd = pair_weights(eq_c + ek_c[:, :, None, :], lam_c, live_c)                     # [X, C, G, M]
    h = jnp.sum(g_c * va_c[:, :, None, :], axis=-1)                                 # [X, C, G]
    deq = deq + pd * h[..., None]
    dek = jnp.sum(pd * h[..., None], axis=2)
    dva = jnp.sum(jnp.sum(pd, axis=-1)[..., None] * g_c, axis=2)
    for size, kh, c, t in _favor_chunk_blocks(eq_c, ek_c):
      nb = C // (2 * size)
      half = lambda x: _halves(x, size)[:, :, 1]
      kf = jnp.exp(kh - _neg_inf_to_zero(c)[:, :, None, :]).reshape(X * nb, size, M)
      qf = pair_weights(t, half(lam_c), half(live_c)).reshape(X * nb, size * G, M)
      gq = half(g_c).reshape(X * nb, size * G, E)
      vh = _halves(va_c, size)[:, :, 0].reshape(X * nb, size, E)
      bm = jnp.einsum("xre,xce->xrc", gq, vh, precision=precision)
      deq_h = qf * jnp.einsum("xrc,xcm->xrm", bm, kf, precision=precision)
      dek_h = kf * jnp.einsum("xrc,xrm->xcm", bm, qf, precision=precision)
      p = jnp.einsum("xrm,xcm->xrc", qf, kf, precision=precision)
      dva_h = jnp.einsum("xrc,xre->xce", p, gq, precision=precision)
      deq = deq + _interleave(None, deq_h.reshape(X, nb, size, G, M))
      dek = dek + _interleave(dek_h.reshape(X, nb, size, M), None)
      dva = dva + _interleave(dva_h.reshape(X, nb, size, E), None)
    return _favor_state_update(state, s, ek_c, va_c, precision), (deq, dek, dva)

  def reverse_body(carry, xs):
    # r = Σ over later rows of exp(e(q_i) − λ_i − u) g_i, u the running per-feature maximum of e(q_i) − λ_i.
    r, u = carry
    eq_c, ek_c, va_c, g_c, lam_c, live_c = xs
    C = eq_c.shape[1]
    kr = jnp.exp(ek_c + u[:, None, :])                                              # max_i p_ijm <= 1
    dek = kr * jnp.einsum("xce,xme->xcm", va_c, r, precision=precision)
    dva = jnp.einsum("xcm,xme->xce", kr, r, precision=precision)
    w = jnp.where(live_c[..., None], eq_c - lam_c[..., None], -jnp.inf)            # [X, C, G, M]
    u_new = jnp.maximum(u, jnp.max(w, axis=(1, 2)))
    u_safe = _neg_inf_to_zero(u_new)
    qr = jnp.exp(w - u_safe[:, None, None, :]).reshape(X, C * G, M)
    r = r * jnp.exp(u - u_safe)[:, :, None] + jnp.einsum("xrm,xre->xme", qr, g_c.reshape(X, C * G, E),
                                                         precision=precision)
    return (r, u_new), (dek, dva)

  xs = tuple(_split_chunks(x, chunk) for x in (eq, ek, va, g, lam, live))
  init = _initial_carry(jnp.zeros((X, M, E), eq.dtype), jnp.full((X, M), -jnp.inf, eq.dtype))
  _, (deq, dek, dva) = lax.scan(forward_body, init, xs)
  _, (dek_later, dva_later) = lax.scan(reverse_body, init, xs, reverse=True)
  return _merge_chunks(deq), _merge_chunks(dek + dek_later), _merge_chunks(dva + dva_later)


_favor_causal.defvjp(_favor_causal_fwd, _favor_causal_bwd)


def _favor_causal_padded(eq_XTGM, ek_XSM, va_XSE, chunk: int, precision) -> jax.Array:
  """:func:`_favor_causal` on sequences padded to whole chunks (chunk rounded up to a power of two)."""
  T, S = eq_XTGM.shape[1], ek_XSM.shape[1]
  length = max(T, S)
  chunk = 1 << (min(chunk, length) - 1).bit_length()
  L = _numerics.round_up(length, chunk)
  eq = _numerics.pad_axis(eq_XTGM, 1, L)
  ek = _numerics.pad_axis(ek_XSM, 1, L, -jnp.inf)
  va = _numerics.pad_axis(va_XSE, 1, L)
  return _favor_causal(T, chunk, precision, eq, ek, va)[:, :T]


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------


def _validate(fn: str, query, key, value, feature_map, is_causal, key_value_seq_lengths):
  query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
  if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
    raise ValueError(f"{fn}: query must be [B, T, N, H] and key/value [B, S, K, H] / [B, S, K, Hv] (rank 4; use "
                     f"jax.vmap for other ranks); got query.shape={query.shape} key.shape={key.shape} "
                     f"value.shape={value.shape}")
  inp = core.prepare_inputs(query, key, value, is_causal=is_causal, key_value_seq_lengths=key_value_seq_lengths)
  return inp, get_feature_map(feature_map, inp.query.shape[-1])


def _empty_output(inp: core.AttentionInputs) -> jax.Array | None:
  """Zeros ``[B, T, N, Hv]`` when any of B, T, N, S, Hv is 0 (no key at all, or nothing to compute)."""
  B, T, N, _ = inp.query.shape
  S, Hv = inp.key.shape[1], inp.value.shape[-1]
  if 0 in (B, T, N, S, Hv):
    return jnp.zeros((B, T, N, Hv), inp.query.dtype)
  return None


def linear_attention(query, key, value, *, feature_map: Any = "elu", is_causal: bool = False,
                     key_value_seq_lengths=None, chunk_size: int | None = None) -> jax.Array:
  """Linear attention ``φ(q)ᵀ Σ_j φ(k_j) v_jᵀ / φ(q)ᵀ Σ_j φ(k_j)`` (see the module docstring).

  Args:
    query: ``[B, T, N, H]``; key: ``[B, S, K, H]``; value: ``[B, S, K, Hv]`` with ``N % K == 0`` (GQA/MQA).
    feature_map: ``"elu"`` (elu + 1), ``"relu"``, ``"taylor"`` (Based), ``favor_feature_map(...)`` or a callable
      ``[..., H] -> [..., D]``.
    is_causal: query i sees keys ``j <= i`` (chunked parallel form, O(T·(C·D + D·Hv)) time).
    key_value_seq_lengths: int ``[B]``; keys at or after the length are padding.
    chunk_size: causal chunk length C (default :data:`DEFAULT_CHUNK_SIZE`; FAVOR+ rounds it up to a power of two);
      ignored when not causal.

  Returns:
    ``[B, T, N, Hv]`` in the input dtype; rows without weight are zeros.

  Under forward-mode or second-order differentiation the causal form (a ``custom_vjp``) computes through
  :func:`linear_attention_reference` instead, which JAX differentiates to any order.
  """
  inp, fmap = _validate("linear_attention", query, key, value, feature_map, is_causal, key_value_seq_lengths)
  chunk = _check_chunk_size(chunk_size)
  empty = _empty_output(inp)
  if empty is not None:
    return empty
  if inp.is_causal and _autodiff.needs_plain_path(inp.query, inp.key, inp.value, fmap):
    return _linear_attention_reference(fmap, inp.query, inp.key, inp.value, inp.kv_lengths, is_causal=True)
  return _linear_attention(fmap, inp.query, inp.key, inp.value, inp.kv_lengths, is_causal=inp.is_causal,
                           chunk=chunk)


# Jitted cores (validated arrays in): calls outside a jit then compile once per configuration instead of
# re-tracing the scan and custom_vjp on every call.
@functools.partial(jax.jit, static_argnames=("is_causal", "chunk"))
def _linear_attention(fmap: FeatureMap, query, key, value, kv_lengths, *, is_causal: bool, chunk: int):
  B, T = query.shape[:2]
  cd = _numerics.compute_dtype(query.dtype)
  precision = _numerics.matmul_precision(cd)
  seen = _seen_keys(B, key.shape[1], T, kv_lengths, is_causal)
  q, k, v, seen_XS = _kv_head_major(query, key, value, seen)
  va = _with_ones(v, cd)
  if isinstance(fmap, FavorFeatureMap):
    eq, ek = fmap.exponents(q).astype(cd), fmap.exponents(k).astype(cd)
    if seen_XS is not None:
      ek = jnp.where(seen_XS[:, :, None], ek, -jnp.inf)
    if is_causal:
      out = _favor_causal_padded(eq, ek, va, chunk, precision)
    else:
      out = _ratio(*_favor_noncausal(eq, ek, va, precision))
  else:
    phi_q, phi_k = _elementwise_features(fmap, q, k)
    if seen_XS is not None:
      phi_k = jnp.where(seen_XS[:, :, None], phi_k, jnp.zeros_like(phi_k))
    if is_causal:
      y = _elementwise_causal(phi_q, phi_k, va, chunk, precision)
    else:
      X, _, G, F = phi_q.shape
      kv_XFE = jnp.einsum("xsf,xse->xfe", phi_k, va, precision=precision)
      y = jnp.einsum("xrf,xfe->xre", phi_q.reshape(X, T * G, F), kv_XFE, precision=precision).reshape(X, T, G, -1)
    out = _ratio(y[..., :-1], y[..., -1])
  out = _token_major(out, B)
  if kv_lengths is not None:   # a row with no key at all is empty, whatever its (possibly NaN) query
    out = jnp.where((kv_lengths > 0)[:, None, None, None], out, jnp.zeros_like(out))
  return out.astype(query.dtype)


def linear_attention_reference(query, key, value, *, feature_map: Any = "elu", is_causal: bool = False,
                               key_value_seq_lengths=None, chunk_size: int | None = None) -> jax.Array:
  """The quadratic "left product": weights ``φ(q_i)·φ(k_j) [B, T, N, S]``, masked, then normalised
  (``chunk_size`` is ignored). FAVOR+ weights are ``Σ_m exp(e_m(q_i) + e_m(k_j) − b_i)`` with ``b_i`` the row's
  largest visible pair exponent: exact, at O(T·S·M) memory. Same mask, empty-row and non-finite rules as
  :func:`linear_attention`; plain JAX, differentiable to any order."""
  del chunk_size
  inp, fmap = _validate("linear_attention_reference", query, key, value, feature_map, is_causal,
                        key_value_seq_lengths)
  empty = _empty_output(inp)
  if empty is not None:
    return empty
  return _linear_attention_reference(fmap, inp.query, inp.key, inp.value, inp.kv_lengths, is_causal=inp.is_causal)


@functools.partial(jax.jit, static_argnames=("is_causal",))
def _linear_attention_reference(fmap: FeatureMap, query, key, value, kv_lengths, *, is_causal: bool):
  B, T, N, H = query.shape
  S, K, Hv = key.shape[1], key.shape[2], value.shape[3]
  G = N // K
  cd = _numerics.compute_dtype(query.dtype)
  seen_BS = _seen_keys(B, S, T, kv_lengths, is_causal)
  if seen_BS is not None:
    key = jnp.where(seen_BS[:, :, None, None], key, jnp.zeros_like(key))
    value = jnp.where(seen_BS[:, :, None, None], value, jnp.zeros_like(value))
  visible_BTS = jnp.ones((B, T, S), bool) if seen_BS is None else jnp.broadcast_to(seen_BS[:, None, :], (B, T, S))
  if is_causal:
    visible_BTS = visible_BTS & jnp.tril(jnp.ones((T, S), bool))[None]
  vis = visible_BTS[:, :, None, None, :]                                           # [B, T, 1, 1, S]
  q_BTKGH = query.reshape(B, T, K, G, H)
  if isinstance(fmap, FavorFeatureMap):
    eq = fmap.exponents(q_BTKGH).astype(cd)                                        # [B, T, K, G, M]
    ek = jnp.transpose(fmap.exponents(key).astype(cd), (0, 2, 1, 3))              # [B, K, S, M]
    e = jnp.where(vis[..., None], eq[:, :, :, :, None, :] + ek[:, None, :, None], -jnp.inf)   # [B,T,K,G,S,M]
    b = lax.stop_gradient(jnp.max(e, axis=(4, 5)))                                  # [B, T, K, G]
    w = jnp.sum(jnp.exp(e - _neg_inf_to_zero(b)[..., None, None]), axis=-1)         # [B, T, K, G, S]
    bad = jnp.zeros((B, T, K, G), bool)
  else:
    phi_q, phi_k = _elementwise_features(fmap, q_BTKGH, key)                       # [B,T,K,G,D], [B,S,K,D]
    fin_q, fin_k = _numerics.finite_rows(phi_q), _numerics.finite_rows(phi_k)
    phi_q = jnp.where(fin_q[..., None], phi_q, jnp.zeros_like(phi_q))
    phi_k = jnp.where(fin_k[..., None], phi_k, jnp.zeros_like(phi_k))
    w = jnp.einsum("btkgd,bskd->btkgs", phi_q, phi_k, precision=_numerics.matmul_precision(cd))
    w = jnp.where(vis, w, jnp.zeros_like(w))
    bad = ~fin_q | jnp.any(vis & ~jnp.transpose(fin_k, (0, 2, 1))[:, None, :, None, :], axis=-1)
  fin_v = _numerics.finite_rows(value)                                                    # [B, S, K]
  v = jnp.where(fin_v[..., None], value, jnp.zeros_like(value)).astype(cd)
  bad = bad | jnp.any(vis & ~jnp.transpose(fin_v, (0, 2, 1))[:, None, :, None, :], axis=-1)
  # Normalise the weights before the value sum: then a row's NaN normaliser never meets its masked pairs' zero
  # weights in the backward (0 * NaN).
  p = jnp.where(vis, _ratio(w, jnp.sum(w, axis=-1)), jnp.zeros_like(w))
  out = jnp.einsum("btkgs,bske->btkge", p, v, precision=_numerics.matmul_precision(cd))
  out = jnp.where(bad[..., None], jnp.full_like(out, jnp.nan), out)
  has_key = jnp.any(visible_BTS, axis=2)[:, :, None, None, None]
  return jnp.where(has_key, out, jnp.zeros_like(out)).reshape(B, T, N, Hv).astype(query.dtype)


class LinearAttentionState(NamedTuple):
  """Recurrent state of causal linear attention, in float32 (float64 for float64)."""
  kv: jax.Array          # [B, K, D, Hv]  Σ_j φ(k_j) v_jᵀ / exp(log_scale)   (per feature d)
  z: jax.Array           # [B, K, D]      Σ_j φ(k_j) / exp(log_scale)
  log_scale: jax.Array   # [B, K, D]      FAVOR+: running maximum of each feature's key exponent (-inf before the
                         #                first key); elementwise maps leave it as is


def init_state(batch_size: int, num_kv_heads: int, head_dim: int, feature_map: Any = "elu", dtype=jnp.float32,
               *, value_head_dim: int | None = None) -> LinearAttentionState:
  """The empty state for :func:`linear_attention_step`. ``dtype`` is the inputs' dtype; the state is kept in
  its compute dtype (float32, or float64 for float64). ``value_head_dim`` defaults to ``head_dim``."""
  B = _int_arg("init_state", "batch_size", batch_size, minimum=0)
  K = _int_arg("init_state", "num_kv_heads", num_kv_heads)
  H = _int_arg("init_state", "head_dim", head_dim)
  Hv = H if value_head_dim is None else _int_arg("init_state", "value_head_dim", value_head_dim)
  try:
    floating = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
  except TypeError:
    floating = False
  if not floating:
    raise ValueError(f"init_state: dtype must be a floating-point dtype; got dtype={dtype!r}")
  cd = _numerics.compute_dtype(dtype)
  D = get_feature_map(feature_map, H).num_features(H)
  return LinearAttentionState(jnp.zeros((B, K, D, Hv), cd), jnp.zeros((B, K, D), cd),
                              jnp.full((B, K, D), -jnp.inf, cd))


def linear_attention_step(state: LinearAttentionState, q_t, k_t, v_t, feature_map: Any = "elu"
                          ) -> tuple[LinearAttentionState, jax.Array]:
  """One decoding step of causal linear attention: add key/value t to the state, then attend with query t.

  ``q_t [B, N, H]``, ``k_t [B, K, H]``, ``v_t [B, K, Hv]`` (one real floating dtype); returns
  ``(new_state, out_t [B, N, Hv])`` (out in ``q_t``'s dtype, the state in float32 or float64). Scanning it over t
  reproduces ``linear_attention(..., is_causal=True)``.
  """
  q_t, k_t, v_t = jnp.asarray(q_t), jnp.asarray(k_t), jnp.asarray(v_t)
  if not all(hasattr(state, f) for f in LinearAttentionState._fields):
    raise ValueError(f"linear_attention_step: state must be a LinearAttentionState (see init_state); got "
                     f"{type(state).__name__}")
  state = LinearAttentionState(*(jnp.asarray(x) for x in (state.kv, state.z, state.log_scale)))
  shapes = (f"q_t.shape={q_t.shape} k_t.shape={k_t.shape} v_t.shape={v_t.shape} state.kv.shape={state.kv.shape}")
  if q_t.ndim != 3 or k_t.ndim != 3 or v_t.ndim != 3 or k_t.shape[:2] != v_t.shape[:2]:
    raise ValueError(f"linear_attention_step: need q_t [B, N, H], k_t [B, K, H] and v_t [B, K, Hv]; got {shapes}")
  _check_float_arrays("linear_attention_step", q_t=q_t, k_t=k_t, v_t=v_t)
  B, N, H = q_t.shape
  K, Hv = k_t.shape[1], v_t.shape[2]
  if k_t.shape[0] != B or k_t.shape[2] != H or K == 0 or N % K:
    raise ValueError(f"linear_attention_step: B and H must match and N % K == 0; got {shapes}")
  fmap = get_feature_map(feature_map, H)
  D = fmap.num_features(H)
  if state.kv.shape != (B, K, D, Hv) or state.z.shape != (B, K, D) or state.log_scale.shape != (B, K, D):
    raise ValueError(f"linear_attention_step: state does not match [B, K, D, Hv] = {(B, K, D, Hv)}; got {shapes} "
                     f"state.z.shape={state.z.shape} state.log_scale.shape={state.log_scale.shape} "
                     "(make it with init_state)")
  for name, x in zip(LinearAttentionState._fields, state):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"linear_attention_step: state.{name} must be floating point; got dtype={x.dtype}")
  return _step(fmap, state, q_t, k_t, v_t)


@jax.jit
def _step(fmap: FeatureMap, state: LinearAttentionState, q_t, k_t, v_t):
  B, N, H = q_t.shape
  K, Hv = k_t.shape[1], v_t.shape[2]
  D = state.kv.shape[2]
  G = N // K
  cd = _numerics.compute_dtype(jnp.promote_types(q_t.dtype, state.kv.dtype))
  kv, z, s_old = (x.astype(cd) for x in state)
  v = v_t.astype(cd)
  if isinstance(fmap, FavorFeatureMap):
    eq, ek = fmap.exponents(q_t).astype(cd).reshape(B, K, G, D), fmap.exponents(k_t).astype(cd)
    s_new = jnp.maximum(s_old, ek)
    s_safe = _neg_inf_to_zero(s_new)
    rescale = jnp.exp(s_old - s_safe)
    kf = jnp.exp(ek - s_safe)
    t = eq + s_new[:, :, None, :]
    qf = jnp.exp(t - _neg_inf_to_zero(lax.stop_gradient(jnp.max(t, axis=-1)))[..., None])
  else:
    phi_q, kf = _elementwise_features(fmap, q_t, k_t)
    qf, s_new, rescale = phi_q.reshape(B, K, G, D), s_old, jnp.ones_like(s_old)
  kv = kv * rescale[..., None] + kf[..., None] * v[:, :, None, :]
  z = z * rescale + kf
  precision = _numerics.matmul_precision(cd)
  num = jnp.einsum("bkgd,bkde->bkge", qf, kv, precision=precision)
  den = jnp.einsum("bkgd,bkd->bkg", qf, z, precision=precision)
  return LinearAttentionState(kv, z, s_new), _ratio(num, den).reshape(B, N, Hv).astype(q_t.dtype)


# The unnormalised recurrences with a matrix state (RetNet / GLA / DeltaNet), part of this module's API.
from attention_jax.linear_rnn import (  # noqa: E402, F401  (re-exported, after this module's definitions)
    decayed_linear_attention, decayed_linear_attention_reference, decayed_linear_attention_step,
    delta_rule_attention, delta_rule_attention_reference, delta_rule_attention_step)

