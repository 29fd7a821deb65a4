"""Input checks shared by every backend.

Checks look only at ``.shape`` and ``.dtype``, so numpy arrays, torch tensors
and jax arrays are checked alike without importing their frameworks; anything
else (lists, scalars) is turned into a numpy array first.
"""

from __future__ import annotations

import numbers

import numpy as np

FLOAT_DTYPES = ("float16", "float32", "float64")


def dtype_name(x) -> str:
    """'float32' for np.float32, torch.float32, jnp.float32 alike."""
    return str(x.dtype).removeprefix("torch.")


def as_array(x, name: str):
    """``x`` itself if it looks like an array, else ``np.asarray(x)``."""
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return x
    try:
        return np.asarray(x)
    except (ValueError, TypeError) as e:
        raise TypeError(f"{name} must be an array, got {type(x).__name__}: {e}") from None


def check_float_array(x, name: str, shape: tuple, accepted: tuple = FLOAT_DTYPES):
    """Check rank, shape and dtype of a float array; ``None`` in ``shape`` matches any size.

    ``shape`` entries are ``(axis_name, size)`` pairs so the error can say which
    axis is wrong, e.g. (("batch", 4), ("tokens", None), ("heads", 8), ("key_dim", 64)).
    """
    x = as_array(x, name)
    dt = dtype_name(x)
    if dt not in accepted:
        raise TypeError(f"{name} must have a float dtype ({', '.join(accepted)}), got {dt}")
    expected = "[" + ", ".join(f"{a}={s}" if s is not None else a for a, s in shape) + "]"
    if len(x.shape) != len(shape):
        raise ValueError(
            f"{name} must have {len(shape)} dims {expected}, got shape {tuple(x.shape)}"
        )
    for axis, ((axis_name, size), actual) in enumerate(zip(shape, x.shape)):
        if size is not None and actual != size:
            raise ValueError(
                f"{name} axis {axis} ({axis_name}) must be {size}, got {actual} "
                f"(shape {tuple(x.shape)}, expected {expected})"
            )
    return x


def check_int_option(name: str, value, minimum: int = 1, maximum: int = 2**31 - 1) -> int:
    """``value`` as an int if it is one (numpy ints too, bool not) in [minimum, maximum], else ValueError naming ``name``.

    The default maximum keeps values within what the C++ libraries take as an int.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value > maximum:
        raise ValueError(f"{name} must be an int <= {maximum}, got {value!r}")
    return int(value)


def check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int, got {type(k).__name__} {k!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return int(k)


def rows_to_mask(rows, batch_size: int) -> np.ndarray:
    """Normalise ``rows`` (None, an int, a sequence of ints or a bool mask [batch]) to a bool mask."""
    if rows is None:
        return np.ones(batch_size, dtype=bool)
    if isinstance(rows, bool):
        raise TypeError("rows must be an int, a sequence of ints or a bool mask [batch], got bool")
    if isinstance(rows, numbers.Integral):
        rows = [rows]
    if hasattr(rows, "cpu") and hasattr(rows, "numpy"):  # a torch tensor
        rows = rows.detach().cpu().numpy()
    arr = np.asarray(rows)
    if arr.dtype == bool:
        if arr.shape != (batch_size,):
            raise ValueError(f"rows as a bool mask must have shape ({batch_size},), got {arr.shape}")
        return arr.copy()
    if arr.size == 0:
        return np.zeros(batch_size, dtype=bool)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(
            f"rows must be an int, a sequence of ints or a bool mask [batch], "
            f"got dtype {arr.dtype} shape {arr.shape}"
        )
    bad = arr[(arr < 0) | (arr >= batch_size)]
    if bad.size:
        raise ValueError(f"rows must be in [0, {batch_size}), got {bad.tolist()}")
    mask = np.zeros(batch_size, dtype=bool)
    mask[arr] = True
    return mask
