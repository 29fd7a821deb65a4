"""Input checks of the functional API: shapes and dtypes when traced, values on request.

Shapes and dtypes are static under ``jax.jit``, so they are checked in
Python when a function is traced (and on every eager call): a bad argument
raises ``ValueError``/``TypeError`` naming it, what was expected and what
came, before anything is computed.

Values are another matter: whether an array holds NaN or inf is only known
on the device, and asking would stop the caller's program for a host sync.
So the pure functions do **not** check values. Two ways to have them checked:

* ``Memory(backend="jax")`` checks every input (one bool read back per
  call, ``check_finite=True``), as every other backend does;
* inside jit, :func:`finite` adds ``checkify`` checks: run the function
  under ``jax.experimental.checkify.checkify`` and ``throw`` its error
  (see :func:`kvmemory_jax.checked`), which reports the first non-finite
  argument by name without any sync of its own.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from kvmemory.validation import check_float_array

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def entries(x, name: str, state, dim_name: str, dim: int, tokens: int | None = None):
    """x [B, T, H, dim] of a float dtype, as a jax array (tracers pass through)."""
    x = check_float_array(x, name, (("batch", state.batch_size), ("tokens", tokens), ("heads", state.num_heads),
                                    (dim_name, dim)), FLOAT_DTYPES)
    return x if isinstance(x, jax.Array) else jnp.asarray(x)


def row_mask(mask, name: str, batch_size: int):
    """A bool [batch_size] array; anything else is refused (row numbers: build the mask first)."""
    dtype = getattr(mask, "dtype", None)
    shape = tuple(getattr(mask, "shape", ()))
    if dtype is None or jnp.dtype(dtype) != jnp.bool_ or shape != (batch_size,):
        raise ValueError(f"{name} must be a bool array [batch={batch_size}], got "
                         f"{dtype if dtype is not None else type(mask).__name__} {shape}")
    return mask if isinstance(mask, jax.Array) else jnp.asarray(mask)


def static_int(name: str, value, minimum: int = 1) -> int:
    """A Python int >= minimum: static arguments such as k cannot be traced values."""
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{name} must be a static Python int (it sets an output shape), got a traced value")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def finite(**arrays) -> None:
    """``checkify.check`` that each named array is free of NaN and inf (only inside ``checkify.checkify``)."""
    for name, x in arrays.items():
        checkify.check(jnp.isfinite(x).all(), f"{name} contains NaN or inf")


def checked(fn):
    """``fn`` under ``checkify`` and ``jax.jit``, raising its failed checks (e.g. ``check_finite=True``) as errors.

    The error is read back after the call (one small host sync): use it where
    that is affordable (tests, debugging, the first steps of a run), or run
    ``checkify.checkify(fn)`` yourself and inspect the error when convenient.
    """
    run = jax.jit(checkify.checkify(fn))

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        err, out = run(*args, **kwargs)
        err.throw()
        return out
    return wrapper
