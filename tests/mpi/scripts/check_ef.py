"""EF-signSGD's exchange equals a numpy oracle: the mean of (|p|_1/d) sign(p), e <- p - delta.

With random adversaries (the last half of the ranks), an adversary's signs are those of the
next d standard normals of its stream and its scale and residual stay honest.
"""

import numpy as np

from mpiopt.algorithms.signum import ScaledSignAverage, adversary_stream, make_tamper
from mpiopt.comm.transport import Channel, Transport

t = Transport(timeout=60)
r, n = t.rank, t.size
SEED = 7
RANDOM = tuple(range(n - max(1, n // 2), n))
for d in (1, 7, 8 * n + 3, 100_003):
    rng = np.random.default_rng([5, d])
    qs = rng.standard_normal((n, d)).astype(np.float32)
    es = (0.1 * rng.standard_normal((n, d))).astype(np.float32)
    qs[:, ::4] = -es[:, ::4]  # p = 0 exactly: sign(0) = +1
    ps = (qs.astype(np.float64) + es)
    scales = np.abs(ps.astype(np.float32)).astype(np.float64).sum(axis=1) / d
    deltas = scales[:, None] * np.where(ps.astype(np.float32) >= 0, 1.0, -1.0)
    want = deltas.mean(axis=0)
    t.reset_stats()
    ex = ScaledSignAverage(t, d, np)
    e = es[r].copy()
    out = np.zeros(d, np.float32)
    ex(qs[r].copy(), e, out)
    assert np.allclose(out, want, rtol=1e-5, atol=1e-6), (d, np.abs(out - want).max())
    resid = ps[r] - deltas[r]
    assert np.allclose(e, resid, rtol=1e-5, atol=1e-5), (d, np.abs(e - resid).max())
    sent = t.stats[Channel.VOTE].sent
    assert sent == (n - 1) * (-(-d // 8) + 8), (d, sent)
    signs = np.where(ps.astype(np.float32) >= 0, 1.0, -1.0)
    for a in RANDOM:
        noise = adversary_stream(SEED, a).standard_normal(d, dtype=np.float32)
        signs[a] = np.where(noise >= 0, 1.0, -1.0)
    want = (scales[:, None] * signs).mean(axis=0)
    tamper = make_tamper("random", np, adversary_stream(SEED, r)) if r in RANDOM else None
    e = es[r].copy()
    out[...] = 0.0
    ScaledSignAverage(t, d, np, tamper)(qs[r].copy(), e, out)
    assert np.allclose(out, want, rtol=1e-5, atol=1e-6), (d, np.abs(out - want).max())
    assert np.allclose(e, resid, rtol=1e-5, atol=1e-5), (d, np.abs(e - resid).max())
t.barrier()
if r == 0:
    print(f"ef checks passed on {n} ranks", flush=True)
