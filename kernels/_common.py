"""Conventions shared by every backend: canonical sums, the counter hash, seeds, validation.

Every kernel must give the same bits on numpy, numba and CuPy. Two pieces make that possible
for the kernels that reduce or draw random numbers:

* **Canonical sum** (``csum``). A sum of float32 values is accumulated in float64 in a fixed
  order: a segment is cut into chunks of :data:`CHUNK` elements; each chunk is summed by 32
  lanes (lane ``j`` adds elements ``j, j+32, j+64, ...`` in order, starting from 0.0) whose
  results are combined by the tree ``a[j] += a[j+off]`` for ``off = 16, 8, 4, 2, 1``; the chunk
  sums are combined by the same 32-lane scheme. A CUDA warp does this naturally (lanes plus
  ``__shfl_down_sync``), numba vectorises it without reassociation, numpy does it with a loop
  of vector adds. QSGD uses it for the bucket norms, EF-signSGD for ``|p|_1``.
* **Counter hash** (``uniform``). QSGD's stochastic rounding draws ``u_i`` from a hash of
  ``(key, i)``, not from a stateful generator, so the codes depend only on the seed, never on
  the thread count or the backend: ``h = mix(mix(i ^ k0) + k1)`` with ``mix`` Chris Wellons'
  ``lowbias32``, and ``u = (h >> 8) * 2**-24`` (24 random bits, exact in float32).
* **Lattice checksum**. ``sum_i k_i * (lowbias32(i) | 1) mod 2**64`` over the lattice points
  ``k_i = round(x_i / eps)``: integer arithmetic, so any summation order gives the same value.
  The receiver recomputes it from the decoded points ``z_i + q * m_i``; a coordinate decoded in
  the wrong window differs by ``q * delta`` with ``delta != 0``, which changes the sum unless
  several errors cancel exactly (and one error never can: its weight is odd).
"""

from __future__ import annotations

import numpy as np

CHUNK = 4096  # elements per chunk of the canonical sum (a multiple of 32 and of 8)
LANES = 32
MIX_A = 0x7FEB352D  # lowbias32 multipliers
MIX_B = 0x846CA68B
U24 = np.float32(2.0**-24)
MASK64 = (1 << 64) - 1
MAX_INDEX = 1 << 32  # QSGD's counter is a 32-bit element index

BACKENDS = ("numpy", "numba", "cupy")

# Lattice checksums work on int64 lattice points; absurd values (|x / eps| > 2**62) are
# clamped, identically on every backend, so that the integer conversion is defined.
K_CLIP = float(1 << 62)
M_CLIP = float(1 << 46)  # window index: q * m stays below 2**62 for q <= 2**16


def splitmix64(z: int) -> int:
    """Return the splitmix64 finaliser of the 64-bit integer ``z``."""
    z = (z + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def derive_seed(seed: int, *counters: int) -> int:
    """Return a 64-bit seed for the stream ``(seed, *counters)``, e.g. ``(run_seed, rank, step)``.

    Distinct tuples give unrelated streams (each element is mixed in by splitmix64).
    """
    z = splitmix64(int(seed) & MASK64)
    for c in counters:
        z = splitmix64(z ^ (int(c) & MASK64))
    return z


def hash_keys(seed_or_state) -> tuple[int, int]:
    """Return the two 32-bit hash keys ``(k0, k1)`` of a seed or a numpy ``Generator``.

    A ``Generator`` is advanced by one 64-bit draw, so consecutive calls with the same
    generator give different streams.
    """
    if isinstance(seed_or_state, np.random.Generator):
        seed = int(seed_or_state.integers(0, 1 << 64, dtype=np.uint64))
    elif isinstance(seed_or_state, (int, np.integer)) and not isinstance(seed_or_state, bool):
        seed = int(seed_or_state)
        if not 0 <= seed <= MASK64:
            raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    else:
        raise TypeError(f"seed must be an int or a numpy Generator, got {type(seed_or_state)}")
    key = splitmix64(seed)
    return key & 0xFFFFFFFF, key >> 32


def check_qsgd(levels: int, bucket: int, d: int) -> None:
    """Raise ``ValueError`` unless ``levels``, ``bucket`` and the length ``d`` are usable."""
    if not 1 <= int(levels) <= 127:
        raise ValueError(f"levels must be in [1, 127], got {levels}")
    if int(bucket) < 1:
        raise ValueError(f"bucket must be >= 1, got {bucket}")
    if d >= MAX_INDEX:
        raise ValueError(f"QSGD supports vectors shorter than 2**32, got {d}")


def lattice_dtype(q: int):
    """Return the code dtype for modulus ``q`` (a power of two in ``[2, 2**16]``)."""
    q = int(q)
    if q < 2 or q > 1 << 16 or q & (q - 1):
        raise ValueError(f"q must be a power of two in [2, 65536], got {q}")
    return np.uint8 if q <= 256 else np.uint16


def check_eps(eps: float) -> float:
    """Return ``eps`` as a float or raise ``ValueError`` unless it is finite and positive."""
    eps = float(eps)
    if not (eps > 0 and np.isfinite(eps)):
        raise ValueError(f"eps must be a positive finite number, got {eps}")
    return eps


def nbytes_signs(d: int) -> int:
    """Return the number of bytes of ``d`` packed sign bits."""
    return (int(d) + 7) // 8


def nbytes_nibbles(d: int) -> int:
    """Return the number of bytes of ``d`` 4-bit codes."""
    return (int(d) + 1) // 2


def vote_threshold(n: int) -> int:
    """Return the least number of +1 votes among ``n`` that makes the vote +1 (ties to +1)."""
    return (int(n) + 1) // 2
