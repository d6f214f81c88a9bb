"""Linear (kernel-trick) attention: elu+1, relu and FAVOR+ feature maps, chunked causal form, recurrent decoding.

A feature map ``φ: R^H -> R^D`` (non-negative) replaces the softmax kernel ``exp(q·k)`` by ``φ(q)·φ(k)``::

    out_i = Σ_j φ(q_i)·φ(k_j) v_j / Σ_j φ(q_i)·φ(k_j)          over the keys j that query i sees.

The weights factorise, so by associativity ``out_i = φ(q_i)ᵀ (Σ_j φ(k_j) v_jᵀ) / φ(q_i)ᵀ (Σ_j φ(k_j))``
(Katharopoulos et al. 2020, "Transformers are RNNs").

* **Non-causal**: one ``[D, H]`` summary ``Σ_j φ(k_j) v_jᵀ`` and ``z = Σ_j φ(k_j)`` per (batch, kv head):
  O((T + S)·D·H) time and O((T + S)·(D + H)) memory. Plain autodiff: what it saves is the size of the features.
* **Causal, chunked parallel form**: the sequence is cut into chunks of C positions; inside a chunk the masked
  quadratic form ``(φ(Q_c) φ(K_c)ᵀ ⊙ tril) V_c``, across chunks a carried ``D x (H+1)`` state (the sum over all
  earlier chunks; the denominator rides along as an all-ones value column): O(T·C·D + T·D·H) time, one state alive
  at a time. The backward is a ``custom_vjp`` made of the same chunked product: ``dQ = causal(dY, V, K)``, and
  ``dK``, ``dV`` are that product on time-reversed sequences (anti-causal sums). It saves only the features and
  values -- no per-step or per-chunk state is stored, so forward + backward memory grows linearly in T.
* **Recurrent decoding**: :func:`linear_attention_step` adds one key/value to the state and attends with one
  query, O(D·H) per token; :func:`init_state` makes the empty state.

Key padding (``key_value_seq_lengths``) zeroes the padded keys' inputs, features and values. GQA: query head n uses
kv head ``n // (N // K)``; kv features and states are never repeated. ``is_causal`` is top-left aligned as in
``jax.nn`` (query i sees keys ``j <= i``, also when T != S). Features, sums and the division run in float32
(float64 for float64 inputs); the output has the input dtype.

**Empty rows.** With non-negative features the output is a convex combination of the visible values. A row with
no weight -- every key padded, relu features of query and keys that never overlap, FAVOR+ mass that underflowed --
returns **zeros with zero gradient**, like a fully masked row in softmax attention. Precisely, rows whose
``|denominator| <= sqrt(tiny)`` (about 1e-19 in float32) count as empty: then ``1/den²``, which the gradient
needs, cannot overflow.

**Feature maps.** ``"elu"``: ``elu(x) + 1``; ``"relu"``: ``max(x, 0)`` (D = H, no scaling of the inputs).
:func:`favor_feature_map` (Performer FAVOR+, Choromanski et al. 2020) with ``x̃ = x / H^(1/4)``::

    φ(x) = exp(W x̃ − ‖x̃‖²/2) / √M,      E_W[φ(q)·φ(k)] = exp(q·k / √H)   (the default softmax kernel),

``W`` [M, H]: Gaussian rows, by default orthogonal within blocks of H (QR of a Gaussian matrix, sign-fixed so that
it is Haar) and rescaled by the norms of independent Gaussian vectors, so each row is still N(0, I) (unbiased) with
lower variance. Redraw by building the map with a new PRNG key. Stabilised: a query row subtracts its own largest
exponent; keys subtract one constant per (batch, kv head), the largest exponent over all valid keys and features.
Each shift is shared by everything that one ratio sums, so it cancels exactly; its gradient is stopped, which is
exact for the same reason. Keys whose exponent is more than ~87 (float32's ``exp`` range) below that largest one
flush to zero. Decoding keeps a running maximum instead and rescales its state when it grows.
Any other callable ``f(x [..., H]) -> [..., D]`` is used as a symmetric feature map (queries and keys alike).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attention_jax import _tiling, core

_HIGHEST = lax.Precision.HIGHEST

# Chunk length of the causal form, by measurement: causal fwd + bwd, float32, B = N = 1, H = 64, T = 16384, on the
# shared 2-core CPU (min over 12 interleaved runs): elu (D = 64) C = 32 / 64 / 128 / 256 -> 200 / 182 / 192 / 269 ms;
# FAVOR+ (D = 256) -> 583 / 611 / 616 / 836 ms. 64 is the best for elu and within 5% of the best for FAVOR+.
DEFAULT_CHUNK_SIZE = 64


# ----------------------------------------------------------------------------------------------------------
# Feature maps
# ----------------------------------------------------------------------------------------------------------


def _elu_plus_one(x: jax.Array) -> jax.Array:
  return jax.nn.elu(x) + 1.0


def _relu(x: jax.Array) -> jax.Array:
  return jax.nn.relu(x)


@functools.partial(jax.tree_util.register_dataclass, data_fields=[], meta_fields=["name", "fn"])
@dataclasses.dataclass(frozen=True)
class ElementwiseFeatureMap:
  """``φ(x) = fn(x)`` for queries and keys alike, no stabiliser (elu+1, relu, or a user callable)."""
  name: str
  fn: Callable[[jax.Array], jax.Array]

  def __call__(self, x: jax.typing.ArrayLike) -> jax.Array:
    x = jnp.asarray(x)
    cd = core._compute_dtype(x.dtype)
    return self.fn(x.astype(cd)).astype(cd)

  def num_features(self, head_dim: int) -> int:
    return jax.eval_shape(self, jax.ShapeDtypeStruct((head_dim,), jnp.float32)).shape[-1]

  def query(self, x: jax.Array) -> jax.Array:
    return self(x)

  def key(self, x_XSH: jax.Array, valid_XS: jax.Array | None = None, floor_X: jax.Array | None = None
          ) -> tuple[jax.Array, jax.Array]:
    """Key features ``[X, S, D]`` (X = batch x kv heads) and the log of the constant they were divided by (0)."""
    del valid_XS, floor_X
    phi = self(x_XSH)
    return phi, jnp.zeros(x_XSH.shape[:1], phi.dtype)


elu_feature_map = ElementwiseFeatureMap("elu", _elu_plus_one)
relu_feature_map = ElementwiseFeatureMap("relu", _relu)
FEATURE_MAPS = {"elu": elu_feature_map, "relu": relu_feature_map}


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
    cd = core._compute_dtype(x.dtype)
    x = x.astype(cd) * (self.head_dim ** -0.25)
    # A 2-D matmul: XLA:CPU runs dots with many (even size-1) batch dims about 2x slower.
    wx = jnp.matmul(x.reshape(-1, self.head_dim), self.projection.astype(cd).T, precision=_HIGHEST)
    return wx.reshape(*x.shape[:-1], -1) - 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)

  def __call__(self, x: jax.typing.ArrayLike) -> jax.Array:
    """The raw (unstabilised) features ``exp(W x̃ − ‖x̃‖²/2) / √M``: ``φ(q)·φ(k)`` estimates ``exp(q·k/√H)``."""
    return jnp.exp(self.exponents(x)) * (self.num_features() ** -0.5)

  def query(self, x: jax.Array) -> jax.Array:
    """Features divided by ``exp(max_m exponent)`` of each row (cancels in that row's ratio)."""
    e = self.exponents(x)
    return jnp.exp(e - lax.stop_gradient(jnp.max(e, axis=-1, keepdims=True))) * (self.num_features() ** -0.5)

  def key(self, x_XSH: jax.Array, valid_XS: jax.Array | None = None, floor_X: jax.Array | None = None
          ) -> tuple[jax.Array, jax.Array]:
    """Features ``[X, S, M]`` divided by ``exp(c)``, ``c [X]`` the largest exponent over valid keys and features
    of each (batch, kv head) ``x``; ``floor_X`` (decoding) is a lower bound for ``c``. Returns ``(features, c)``."""
    e_XSM = self.exponents(x_XSH)
    e_for_max = e_XSM if valid_XS is None else jnp.where(valid_XS[:, :, None], e_XSM, -jnp.inf)
    c_X = jnp.max(e_for_max, axis=(1, 2), initial=-jnp.inf)
    if floor_X is not None:
      c_X = jnp.maximum(c_X, floor_X)
    c_X = lax.stop_gradient(jnp.where(jnp.isfinite(c_X), c_X, jnp.zeros_like(c_X)))
    return jnp.exp(e_XSM - c_X[:, None, None]) * (self.num_features() ** -0.5), c_X


FeatureMap = Union[ElementwiseFeatureMap, FavorFeatureMap]


def favor_feature_map(rng: jax.Array, head_dim: int, num_features: int = 256, orthogonal: bool = True
                      ) -> FavorFeatureMap:
  """Performer FAVOR+ positive random features for heads of size ``head_dim`` (see the module docstring).

  ``orthogonal``: rows orthogonal within each block of ``head_dim`` (lower variance); else i.i.d. Gaussian rows.
  A new ``rng`` draws new features. Pure and jit-able (``head_dim``, ``num_features`` static).
  """
  if int(head_dim) <= 0 or int(num_features) <= 0:
    raise ValueError(f"favor_feature_map: head_dim and num_features must be positive; got {head_dim=} {num_features=}")
  return FavorFeatureMap(_favor_projection(rng, int(head_dim), int(num_features), bool(orthogonal)))


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
  """``"elu"``, ``"relu"``, a map from this module or any callable -> a feature map (``ValueError`` otherwise)."""
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
  raise ValueError(f"feature_map must be 'elu', 'relu' or a callable; got {feature_map!r}")


# ----------------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------------


def _prepare(query, key, value, feature_map, is_causal, key_value_seq_lengths):
  inp = core.prepare_inputs(query, key, value, is_causal=is_causal, key_value_seq_lengths=key_value_seq_lengths)
  return inp, get_feature_map(feature_map, inp.query.shape[-1])


def _head_major_inputs(inp: core.AttentionInputs, zero_padded_keys: bool):
  """``q [X, G, T, H]``, ``k, v [X, S, H]`` (X = B*K) and bool ``valid [X, S]`` (None without padding)."""
  B, S, K, H = inp.key.shape
  q, k, v = _head_major_queries(inp.query, K), _head_major_keys(inp.key), _head_major_keys(inp.value)
  if inp.kv_lengths is None:
    return q, k, v, None
  valid_BS = jnp.arange(S, dtype=jnp.int32)[None, :] < inp.kv_lengths[:, None]
  valid_XS = jnp.broadcast_to(valid_BS[:, None, :], (B, K, S)).reshape(B * K, S)
  if zero_padded_keys:
    k = jnp.where(valid_XS[:, :, None], k, jnp.zeros_like(k))
    v = jnp.where(valid_XS[:, :, None], v, jnp.zeros_like(v))
  return q, k, v, valid_XS


def _features(fmap: FeatureMap, q_XGTH, k_XSH, valid_XS):
  """``φ(q) [X, G, T, D]`` and ``φ(k) [X, S, D]`` in the compute dtype (key stabiliser over valid keys only)."""
  cd = core._compute_dtype(q_XGTH.dtype)
  phi_q, (phi_k, _) = fmap.query(q_XGTH), fmap.key(k_XSH, valid_XS)
  if phi_q.shape[:-1] != q_XGTH.shape[:-1] or phi_k.shape[:-1] != k_XSH.shape[:-1] or phi_q.shape[-1] != phi_k.shape[-1]:
    raise ValueError(f"feature map must map [..., H] -> [..., D] alike for queries and keys; got {q_XGTH.shape} -> "
                     f"{phi_q.shape}, {k_XSH.shape} -> {phi_k.shape}")
  return phi_q.astype(cd), phi_k.astype(cd)


def _normalize(num: jax.Array, den: jax.Array, dtype) -> jax.Array:
  """``num / den`` on rows with weight, zeros (and zero gradient) where ``|den| <= sqrt(tiny)``."""
  has_weight = jnp.abs(den) > math.sqrt(jnp.finfo(den.dtype).tiny)
  safe = jnp.where(has_weight, den, jnp.ones_like(den))
  return jnp.where(has_weight, num / safe, jnp.zeros_like(num)).astype(dtype)


def _precision(dtype):
  return _HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _check_chunk_size(chunk_size) -> int:
  if chunk_size is None:
    return DEFAULT_CHUNK_SIZE
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size <= 0:
    raise ValueError(f"chunk_size must be a positive int (or None for {DEFAULT_CHUNK_SIZE}); got {chunk_size!r}")
  return int(chunk_size)


# ----------------------------------------------------------------------------------------------------------
# The chunked causal product and its backward
# ----------------------------------------------------------------------------------------------------------


def _chunked_causal_product(q, k, v, chunk: int, precision):
  """``y[g, i] = Σ_{g', j <= i} (q[g, i]·k[g', j]) v[g', j]`` chunk by chunk, carrying ``Σ kᵀv`` between chunks.

  ``q [X, Gq, L, F]``, ``k [X, Gk, L, F]``, ``v [X, Gk, L, E]`` -> ``y [X, Gq, L, E]`` (X = batch x kv heads);
  ``L % chunk == 0``. The heads ``g`` of either side share their kv head's sums (GQA in both directions).
  Everything is a 3-D batched matmul: XLA:CPU runs those about twice as fast as ones with more batch dims.
  """
  X, Gq, L, F = q.shape
  Gk, E = k.shape[1], v.shape[-1]
  n = L // chunk

  def split(x):   # [X, G, L, d] -> [n, X, G * chunk, d]
    g, d = x.shape[1], x.shape[-1]
    return jnp.moveaxis(x.reshape(X, g, n, chunk, d), 2, 0).reshape(n, X, g * chunk, d)

  rows = np.arange(Gq * chunk) % chunk
  cols = np.arange(Gk * chunk) % chunk
  causal_1MN = jnp.asarray(cols[None, :] <= rows[:, None])[None]

  def body(state_XFE, xs):
    q_c, k_c, v_c = xs
    s_XMN = jnp.einsum("xmf,xnf->xmn", q_c, k_c, precision=precision)
    s_XMN = jnp.where(causal_1MN, s_XMN, jnp.zeros_like(s_XMN))
    y = (jnp.einsum("xmn,xne->xme", s_XMN, v_c, precision=precision) +
         jnp.einsum("xmf,xfe->xme", q_c, state_XFE, precision=precision))
    return state_XFE + jnp.einsum("xnf,xne->xfe", k_c, v_c, precision=precision), y

  _, y = lax.scan(body, jnp.zeros((X, F, E), q.dtype), (split(q), split(k), split(v)))
  return jnp.moveaxis(y.reshape(n, X, Gq, chunk, E), 0, 2).reshape(X, Gq, L, E)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _causal_product(chunk: int, precision, q, k, v):
  return _chunked_causal_product(q, k, v, chunk, precision)


def _causal_product_fwd(chunk, precision, q, k, v):
  return _chunked_causal_product(q, k, v, chunk, precision), (q, k, v)


def _causal_product_bwd(chunk, precision, res, dy):
  """dQ_i = Σ_{j<=i} (dy_i·v_j) k_j; dK_j = Σ_{i>=j} (v_j·dy_i) q_i; dV_j = Σ_{i>=j} (k_j·q_i) dy_i."""
  q, k, v = res
  flip = functools.partial(jnp.flip, axis=2)
  dq = _chunked_causal_product(dy, v, k, chunk, precision)
  dk = flip(_chunked_causal_product(flip(v), flip(dy), flip(q), chunk, precision))
  dv = flip(_chunked_causal_product(flip(k), flip(q), flip(dy), chunk, precision))
  return dq, dk, dv


_causal_product.defvjp(_causal_product_fwd, _causal_product_bwd)


def _pad_to(x: jax.Array, axis: int, size: int) -> jax.Array:
  if x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)


def _head_major_queries(x_BTNF: jax.Array, K: int) -> jax.Array:
  """``[B, T, N, F] -> [B*K, G, T, F]``."""
  B, T, N, F = x_BTNF.shape
  return jnp.transpose(x_BTNF.reshape(B, T, K, N // K, F), (0, 2, 3, 1, 4)).reshape(B * K, N // K, T, F)


def _head_major_keys(x_BSKF: jax.Array) -> jax.Array:
  """``[B, S, K, F] -> [B*K, S, F]``."""
  B, S, K, F = x_BSKF.shape
  return jnp.transpose(x_BSKF, (0, 2, 1, 3)).reshape(B * K, S, F)


def _token_major(y_XGTE: jax.Array, B: int) -> jax.Array:
  """``[B*K, G, T, E] -> [B, T, K*G, E]``."""
  X, G, T, E = y_XGTE.shape
  return jnp.transpose(y_XGTE.reshape(B, X // B, G, T, E), (0, 3, 1, 2, 4)).reshape(B, T, X // B * G, E)


def _causal(phi_q_XGTF, phi_k_XSF, v_XSE, chunk: int, precision) -> jax.Array:
  """Causal numerators ``[X, G, T, E]`` (values carry the ones column) by the chunked product."""
  T, S = phi_q_XGTF.shape[2], phi_k_XSF.shape[1]
  length = max(T, S, 1)       # positions past S are zero keys; rows past T are dropped
  chunk = min(chunk, length)
  L = _tiling.cdiv(length, chunk) * chunk
  q = _pad_to(phi_q_XGTF, 2, L)
  k, v = _pad_to(phi_k_XSF, 1, L)[:, None], _pad_to(v_XSE, 1, L)[:, None]
  return _causal_product(chunk, precision, q, k, v)[:, :, :T]


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------


def linear_attention(query, key, value, *, feature_map: Any = "elu", is_causal: bool = False,
                     key_value_seq_lengths=None, chunk_size: int | None = None) -> jax.Array:
  """Linear attention ``φ(q)ᵀ Σ_j φ(k_j) v_jᵀ / φ(q)ᵀ Σ_j φ(k_j)`` (see the module docstring).

  Args:
    query: ``[B, T, N, H]``; key, value: ``[B, S, K, H]`` with ``N % K == 0`` (GQA/MQA).
    feature_map: ``"elu"`` (elu + 1), ``"relu"``, ``favor_feature_map(...)`` or a callable ``[..., H] -> [..., D]``.
    is_causal: query i sees keys ``j <= i`` (chunked parallel form, O(T·(C·D + D·H)) time).
    key_value_seq_lengths: int ``[B]``; keys at or after the length are padding.
    chunk_size: causal chunk length C (default :data:`DEFAULT_CHUNK_SIZE`); ignored when not causal.

  Returns:
    ``[B, T, N, H]`` in the input dtype; rows without weight are zeros.
  """
  inp, fmap = _prepare(query, key, value, feature_map, is_causal, key_value_seq_lengths)
  return _linear_attention(fmap, inp.query, inp.key, inp.value, inp.kv_lengths, is_causal=inp.is_causal,
                           chunk=_check_chunk_size(chunk_size))


# Jitted cores (validated arrays in): calls outside a jit then compile once per configuration instead of
# re-tracing the scan and custom_vjp on every call.
@functools.partial(jax.jit, static_argnames=("is_causal", "chunk"))
def _linear_attention(fmap: FeatureMap, query, key, value, kv_lengths, *, is_causal: bool, chunk: int):
  inp = core.prepare_inputs(query, key, value, is_causal=is_causal, key_value_seq_lengths=kv_lengths)
  q, k, v, valid_XS = _head_major_inputs(inp, zero_padded_keys=True)
  phi_q, phi_k = _features(fmap, q, k, valid_XS)
  v = v.astype(phi_q.dtype)
  if valid_XS is not None:
    phi_k = jnp.where(valid_XS[:, :, None], phi_k, jnp.zeros_like(phi_k))
  precision = _precision(inp.query.dtype)
  if inp.is_causal:
    y_XGTE = _causal(phi_q, phi_k, jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1),
                     chunk, precision)
    num, den = y_XGTE[..., :-1], y_XGTE[..., -1:]
  else:
    X, G, T, F = phi_q.shape
    phi_q_XMF = phi_q.reshape(X, G * T, F)
    kv_XFH = jnp.einsum("xsf,xsh->xfh", phi_k, v, precision=precision)
    num = jnp.einsum("xmf,xfh->xmh", phi_q_XMF, kv_XFH, precision=precision).reshape(X, G, T, -1)
    den = jnp.einsum("xmf,xf->xm", phi_q_XMF, jnp.sum(phi_k, axis=1), precision=precision).reshape(X, G, T, 1)
  return _token_major(_normalize(num, den, inp.query.dtype), inp.query.shape[0])


def linear_attention_reference(query, key, value, *, feature_map: Any = "elu", is_causal: bool = False,
                               key_value_seq_lengths=None, chunk_size: int | None = None) -> jax.Array:
  """The quadratic "left product": weights ``φ(q)φ(k)ᵀ [B, N, T, S]``, masked, then normalised (``chunk_size``
  is ignored). Same feature map (and stabilisers), mask and empty-row rule as :func:`linear_attention`."""
  del chunk_size
  inp, fmap = _prepare(query, key, value, feature_map, is_causal, key_value_seq_lengths)
  return _linear_attention_reference(fmap, inp.query, inp.key, inp.value, inp.kv_lengths, is_causal=inp.is_causal)


@functools.partial(jax.jit, static_argnames=("is_causal",))
def _linear_attention_reference(fmap: FeatureMap, query, key, value, kv_lengths, *, is_causal: bool):
  inp = core.prepare_inputs(query, key, value, is_causal=is_causal, key_value_seq_lengths=kv_lengths)
  B, T, N, H = inp.query.shape
  S, K = inp.key.shape[1:3]
  q, k, _, valid_XS = _head_major_inputs(inp, zero_padded_keys=False)
  phi_q, phi_k = _features(fmap, q, k, valid_XS)
  phi_q_BTNF = _token_major(phi_q, B)
  phi_k_BSKF = jnp.transpose(phi_k.reshape(B, K, S, -1), (0, 2, 1, 3))
  w_BKGTS = jnp.einsum("btkgf,bskf->bkgts", phi_q_BTNF.reshape(B, T, K, N // K, -1), phi_k_BSKF,
                       precision=_HIGHEST)
  mask = core.combined_mask(inp)     # [B|1, 1, T, S]
  if mask is not None:
    w_BKGTS = jnp.where(mask[:, :, None], w_BKGTS, jnp.zeros_like(w_BKGTS))
  num = jnp.einsum("bkgts,bskh->btkgh", w_BKGTS, inp.value.astype(phi_q.dtype), precision=_HIGHEST)
  den = jnp.transpose(jnp.sum(w_BKGTS, axis=-1), (0, 3, 1, 2))[..., None]
  return _normalize(num, den, inp.query.dtype).reshape(B, T, N, H)


class LinearAttentionState(NamedTuple):
  """Recurrent state of causal linear attention (compute dtype, float32 by default)."""
  kv: jax.Array          # [B, K, D, H]  Σ_j φ(k_j) v_jᵀ / exp(log_scale)
  z: jax.Array           # [B, K, D]     Σ_j φ(k_j) / exp(log_scale)
  log_scale: jax.Array   # [B, K]        stabiliser of the sums (-inf before the first key; 0 for elu/relu)


def init_state(batch_size: int, num_kv_heads: int, head_dim: int, feature_map: Any = "elu",
               dtype=jnp.float32) -> LinearAttentionState:
  """The empty state for :func:`linear_attention_step`."""
  D = get_feature_map(feature_map, head_dim).num_features(head_dim)
  B, K, H = batch_size, num_kv_heads, head_dim
  return LinearAttentionState(jnp.zeros((B, K, D, H), dtype), jnp.zeros((B, K, D), dtype),
                              jnp.full((B, K), -jnp.inf, dtype))


def linear_attention_step(state: LinearAttentionState, q_t, k_t, v_t, feature_map: Any = "elu"
                          ) -> tuple[LinearAttentionState, jax.Array]:
  """One decoding step of causal linear attention: add key/value t to the state, then attend with query t.

  ``q_t [B, N, H]``, ``k_t``/``v_t [B, K, H]``; returns ``(new_state, out_t [B, N, H])`` (out in ``q_t``'s dtype).
  Scanning it over t reproduces ``linear_attention(..., is_causal=True)``.
  """
  q_t, k_t, v_t = jnp.asarray(q_t), jnp.asarray(k_t), jnp.asarray(v_t)
  shapes = f"q_t.shape={q_t.shape} k_t.shape={k_t.shape} v_t.shape={v_t.shape} state.kv.shape={state.kv.shape}"
  if q_t.ndim != 3 or k_t.ndim != 3 or k_t.shape != v_t.shape:
    raise ValueError(f"linear_attention_step: need q_t [B, N, H] and k_t, v_t [B, K, H]; got {shapes}")
  B, N, H = q_t.shape
  K = k_t.shape[1]
  if k_t.shape[0] != B or k_t.shape[2] != H or K == 0 or N % K:
    raise ValueError(f"linear_attention_step: B and H must match and N % K == 0; got {shapes}")
  fmap = get_feature_map(feature_map, H)
  D = fmap.num_features(H)
  if state.kv.shape != (B, K, D, H) or state.z.shape != (B, K, D) or state.log_scale.shape != (B, K):
    raise ValueError(f"linear_attention_step: state does not match [B, K, D, H] = {(B, K, D, H)}; got {shapes} "
                     f"state.z.shape={state.z.shape} state.log_scale.shape={state.log_scale.shape}")
  return _step(fmap, state, q_t, k_t, v_t)


@jax.jit
def _step(fmap: FeatureMap, state: LinearAttentionState, q_t, k_t, v_t):
  B, N, H = q_t.shape
  K = k_t.shape[1]
  D = state.kv.shape[2]
  cd = state.kv.dtype
  G = N // K
  phi_q = fmap.query(q_t).astype(cd).reshape(B * K, G, D)
  phi_k, log_scale = fmap.key(k_t.reshape(B * K, 1, H), floor_X=state.log_scale.reshape(B * K))
  phi_k, log_scale = phi_k.reshape(B, K, D).astype(cd), log_scale.reshape(B, K).astype(cd)
  old = state.log_scale
  rescale_BK = jnp.where(jnp.isfinite(old), jnp.exp(old - log_scale), jnp.zeros_like(old))
  kv = state.kv * rescale_BK[:, :, None, None] + phi_k[..., :, None] * v_t.astype(cd)[..., None, :]
  z = state.z * rescale_BK[:, :, None] + phi_k
  precision = _precision(q_t.dtype)
  num = jnp.einsum("xgd,xdh->xgh", phi_q, kv.reshape(B * K, D, H), precision=precision).reshape(B, N, H)
  den = jnp.einsum("xgd,xd->xg", phi_q, z.reshape(B * K, D), precision=precision).reshape(B, N, 1)
  return LinearAttentionState(kv, z, log_scale), _normalize(num, den, q_t.dtype)
