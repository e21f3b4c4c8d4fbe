"""EF-signSGD's exchange equals a numpy oracle: the mean of (|p|_1/d) sign(p), e <- p - delta."""

import numpy as np

from mpiopt.algorithms.signum import ScaledSignAverage
from mpiopt.comm.transport import Channel, Transport

t = Transport(timeout=60)
r, n = t.rank, t.size
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
t.barrier()
if r == 0:
    print(f"ef checks passed on {n} ranks", flush=True)
