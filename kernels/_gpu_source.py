"""CUDA C source of the CuPy kernels (a plain string: importing this compiles nothing).

Written to give the same bits as :mod:`.reference`: the options turn off FMA contraction and
ask for IEEE division and square root; warps implement the canonical 32-lane sums with
``__shfl_down_sync``; sign bits are gathered with ``__ballot_sync`` and put in
``numpy.packbits`` order by reversing the bits (``__brev``) and then the bytes of the word.

CuPy compiles every raw module with ``-ftz=true`` appended after the caller's options, so
single-precision instructions flush subnormals to zero. The kernels therefore never let a
subnormal float32 meet a float32 instruction: signs are read from the bits, float32 values
enter float64 arithmetic through ``f2d`` and leave it through ``d2f`` (both exact for
subnormals, done with integer arithmetic), and float32 sums are computed in float64 and
rounded once (exact: a double holds the sum of two floats closely enough that the rounding to
float equals the IEEE float32 addition). Double-precision instructions never flush.
"""

OPTIONS = ("--fmad=false", "--prec-div=true", "--prec-sqrt=true", "-std=c++14")

SOURCE = r"""
typedef long long i64;
typedef unsigned int u32;
typedef unsigned char u8;
#define FULL 0xffffffffu
#define CHUNK 4096
#define TID ((i64)blockIdx.x * blockDim.x + threadIdx.x)
#define NTHREADS ((i64)gridDim.x * blockDim.x)
#define LANE (threadIdx.x & 31)

// float32 -> float64, exact for subnormals too (cvt.ftz would flush them).
__device__ __forceinline__ double f2d(float v) {
    u32 b = __float_as_uint(v);
    if ((b & 0x7f800000u) != 0u) return (double)v;
    double m = (double)(b & 0x7fffffu) * 1.4012984643248171e-45;  // 2^-149
    return (b >> 31) ? -m : m;
}

// float64 -> float32 rounded to nearest even, exact for subnormal results too.
__device__ __forceinline__ float d2f(double v) {
    double a = fabs(v);
    if (!(a < 1.1754943508222875e-38)) return (float)v;  // 2^-126: a normal result
    u32 m = (u32)rint(a * 7.1362384635297994e+44);  // 2^149
    return __uint_as_float(m | (signbit(v) ? 0x80000000u : 0u));
}

// x >= 0 from the bits (sign(0) = sign(-0) = +1; NaN false), immune to flushing.
__device__ __forceinline__ bool nonneg(float v) {
    u32 b = __float_as_uint(v);
    return b == 0x80000000u || ((b >> 31) == 0u && b <= 0x7f800000u);
}

__device__ __forceinline__ u32 mix32(u32 h) {
    h ^= h >> 16; h *= 0x7feb352du; h ^= h >> 15; h *= 0x846ca68bu; h ^= h >> 16;
    return h;
}

__device__ __forceinline__ double uniform24(u32 i, u32 k0, u32 k1) {
    return (double)(mix32(mix32(i ^ k0) + k1) >> 8) * 5.9604644775390625e-08;
}

// a[j] += a[j + off] for off = 16, 8, 4, 2, 1: lane 0 ends with the canonical sum.
__device__ __forceinline__ double warp_tree(double v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(FULL, v, off);
    return __shfl_sync(FULL, v, 0);
}

// 32 predicates of a warp as 4 bytes in numpy.packbits order (lane 0 -> bit 7 of byte 0).
__device__ __forceinline__ u32 ballot_bytes(bool bit) {
    return __byte_perm(__brev(__ballot_sync(FULL, bit)), 0, 0x0123);
}

__device__ __forceinline__ double lanesum_sq(const float* v, i64 n) {
    double acc = 0.0;
#pragma unroll 4
    for (i64 i = LANE; i < n; i += 32) { double y = f2d(v[i]); acc += y * y; }
    return warp_tree(acc);
}

__device__ __forceinline__ double lanesum(const double* v, i64 n) {
    double acc = 0.0;
    for (i64 i = LANE; i < n; i += 32) acc += v[i];
    return warp_tree(acc);
}

__device__ __forceinline__ double qscale(float norm, double s) {
    double n = f2d(norm);
    return n > 0.0 ? s / n : 0.0;
}

__device__ __forceinline__ int quant1(float v, u32 i, double sc, double s, u32 k0, u32 k1) {
    double r = fabs(f2d(v)) * sc;
    if (r > s) r = s;
    double low = floor(r);
    int lev = (int)low + (uniform24(i, k0, k1) < r - low ? 1 : 0);
    return (__float_as_uint(v) >> 31) ? -lev : lev;
}

extern "C" __global__ void copy_f32(const float* __restrict__ x, float* __restrict__ y, i64 d) {
    for (i64 i = TID; i < d; i += NTHREADS) y[i] = x[i];
}

// A warp takes PACK_WORDS consecutive 32-element words per step, all loads issued first.
#define PACK_WORDS 4
extern "C" __global__ void pack_signs(const float* __restrict__ x, u8* __restrict__ out, i64 d) {
    i64 nbytes = (d + 7) >> 3, nwords = (d + 31) >> 5;
    for (i64 w0 = (TID >> 5) * PACK_WORDS; w0 < nwords; w0 += (NTHREADS >> 5) * PACK_WORDS) {
        bool bit[PACK_WORDS];
#pragma unroll
        for (int u = 0; u < PACK_WORDS; ++u) {
            i64 i = ((w0 + u) << 5) + LANE;
            bit[u] = i < d && nonneg(x[i]);
        }
#pragma unroll
        for (int u = 0; u < PACK_WORDS; ++u) {
            u32 v = ballot_bytes(bit[u]);
            i64 o = ((w0 + u) << 2) + LANE;
            if (LANE < 4 && o < nbytes) out[o] = (u8)(v >> (8 * LANE));
        }
    }
}

extern "C" __global__ void unpack_signs(const u8* __restrict__ p, float* __restrict__ out,
                                        i64 d, float pos, float neg) {
    for (i64 i = TID; i < d; i += NTHREADS)
        out[i] = ((p[i >> 3] >> (7 - (i & 7))) & 1u) ? pos : neg;
}

extern "C" __global__ void majority_vote(const u8* __restrict__ st, u8* __restrict__ out,
                                         int n, i64 nbytes) {
    int t = (n + 1) / 2;
    for (i64 j = TID; j < nbytes; j += NTHREADS) {
        int c[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int r = 0; r < n; ++r) {
            u32 b = st[(i64)r * nbytes + j];
            for (int k = 0; k < 8; ++k) c[k] += (b >> k) & 1u;
        }
        u32 v = 0;
        for (int k = 0; k < 8; ++k) v |= (u32)(c[k] >= t) << k;
        out[j] = (u8)v;
    }
}

// Buckets of at most CHUNK elements: one warp per bucket, norm then int8 codes (from cache).
extern "C" __global__ void qsgd_fused(const float* __restrict__ x, signed char* __restrict__ codes,
                                      float* __restrict__ norms, i64 d, i64 bucket, i64 nb,
                                      double s_f, u32 k0, u32 k1, int write_codes) {
    for (i64 b = TID >> 5; b < nb; b += NTHREADS >> 5) {
        i64 s = b * bucket, n = min(bucket, d - s);
        float norm = d2f(sqrt(lanesum_sq(x + s, n)));
        if (LANE == 0) norms[b] = norm;
        if (!write_codes) continue;
        double sc = qscale(norm, s_f);
        for (i64 i = LANE; i < n; i += 32)
            codes[s + i] = (signed char)quant1(x[s + i], (u32)(s + i), sc, s_f, k0, k1);
    }
}

// Buckets longer than CHUNK: one warp per (bucket, chunk) for the partial sums ...
extern "C" __global__ void qsgd_partials(const float* __restrict__ x, double* __restrict__ part,
                                         i64 d, i64 bucket, i64 cpb, i64 total) {
    for (i64 idx = TID >> 5; idx < total; idx += NTHREADS >> 5) {
        i64 b = idx / cpb, c = idx % cpb;
        i64 s = b * bucket + c * CHUNK;
        i64 e = min(min(d, b * bucket + bucket), s + CHUNK);
        double acc = s < e ? lanesum_sq(x + s, e - s) : 0.0;
        if (LANE == 0) part[idx] = acc;
    }
}

// ... then one warp per bucket over its partials (zero past the end of the last bucket).
extern "C" __global__ void qsgd_norms(const double* __restrict__ part, float* __restrict__ norms,
                                      i64 nb, i64 cpb) {
    for (i64 b = TID >> 5; b < nb; b += NTHREADS >> 5) {
        float norm = d2f(sqrt(lanesum(part + b * cpb, cpb)));
        if (LANE == 0) norms[b] = norm;
    }
}

extern "C" __global__ void qsgd_codes(const float* __restrict__ x, const float* __restrict__ norms,
                                      signed char* __restrict__ codes, i64 d, u32 bucket,
                                      double s_f, u32 k0, u32 k1) {
    for (i64 i = TID; i < d; i += NTHREADS) {
        double sc = qscale(norms[(u32)i / bucket], s_f);
        codes[i] = (signed char)quant1(x[i], (u32)i, sc, s_f, k0, k1);
    }
}

extern "C" __global__ void qsgd_codes4(const float* __restrict__ x, const float* __restrict__ norms,
                                       u8* __restrict__ out, i64 d, u32 bucket, double s_f,
                                       u32 k0, u32 k1) {
    i64 nbytes = (d + 1) >> 1;
    for (i64 j = TID; j < nbytes; j += NTHREADS) {
        u32 i = (u32)(2 * j);
        int hi = quant1(x[i], i, qscale(norms[i / bucket], s_f), s_f, k0, k1);
        int lo = 0;
        if ((i64)i + 1 < d)
            lo = quant1(x[i + 1], i + 1, qscale(norms[(i + 1) / bucket], s_f), s_f, k0, k1);
        out[j] = (u8)(((hi & 15) << 4) | (lo & 15));
    }
}

extern "C" __global__ void qsgd_dequant(const signed char* __restrict__ codes,
                                        const float* __restrict__ norms, float* __restrict__ out,
                                        i64 d, u32 bucket, double s_f) {
    for (i64 i = TID; i < d; i += NTHREADS)
        out[i] = d2f((double)codes[i] * (f2d(norms[(u32)i / bucket]) / s_f));
}

extern "C" __global__ void qsgd_dequant4(const u8* __restrict__ codes,
                                         const float* __restrict__ norms, float* __restrict__ out,
                                         i64 d, u32 bucket, double s_f) {
    for (i64 i = TID; i < d; i += NTHREADS) {
        int v = (i & 1) ? (codes[i >> 1] & 15) : (codes[i >> 1] >> 4);
        out[i] = d2f((double)(v >= 8 ? v - 16 : v) * (f2d(norms[(u32)i / bucket]) / s_f));
    }
}

__device__ __forceinline__ unsigned long long weight(i64 i) {
    return (unsigned long long)mix32((u32)i) | 1ULL;
}

// Sum a per-thread checksum over the warp (integer: any order) and add it to *cs.
__device__ __forceinline__ void add_checksum(unsigned long long acc, unsigned long long* cs) {
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(FULL, acc, off);
    if (LANE == 0 && acc) atomicAdd(cs, acc);
}

#define K_CLIP 4611686018427387904.0
#define M_CLIP 70368744177664.0

#define LATTICE(T, SUFFIX)                                                                     \
extern "C" __global__ void lattice_encode_##SUFFIX(const float* __restrict__ x,                \
        T* __restrict__ out, i64 d, double eps, double qf, unsigned long long* cs) {           \
    double inv_q = 1.0 / qf;                                                                   \
    unsigned long long acc = 0;                                                                \
    for (i64 i = TID; i < d; i += NTHREADS) {                                                  \
        double k = rint(f2d(x[i]) / eps);                                                      \
        out[i] = (T)(i64)(k - qf * floor(k * inv_q));                                          \
        acc += (unsigned long long)(i64)fmin(fmax(k, -K_CLIP), K_CLIP) * weight(i);            \
    }                                                                                          \
    add_checksum(acc, cs);                                                                     \
}                                                                                              \
extern "C" __global__ void lattice_decode_##SUFFIX(const T* __restrict__ z,                    \
        const float* __restrict__ ref, float* __restrict__ out, i64 d, double eps, i64 q,      \
        double thr, unsigned long long* count, unsigned long long* cs) {                       \
    double qeps = (double)q * eps;                                                             \
    unsigned long long acc = 0;                                                                \
    for (i64 i = TID; i < d; i += NTHREADS) {                                                  \
        double t = eps * (double)z[i], b = f2d(ref[i]);                                        \
        double m = rint((b - t) / qeps);                                                       \
        double xh = t + qeps * m;                                                              \
        out[i] = d2f(xh);                                                                      \
        if (fabs(xh - b) >= thr) atomicAdd(count, 1ULL);                                       \
        i64 k = (i64)z[i] + q * (i64)fmin(fmax(m, -M_CLIP), M_CLIP);                           \
        acc += (unsigned long long)k * weight(i);                                              \
    }                                                                                          \
    add_checksum(acc, cs);                                                                     \
}
LATTICE(u8, u8)
LATTICE(unsigned short, u16)

// One warp per chunk: p = g + e (stored back in e), pack p >= 0, lane sums of |p|.
extern "C" __global__ void ef_chunks(const float* __restrict__ g, float* __restrict__ err,
                                     int has_err, u8* __restrict__ out,
                                     double* __restrict__ part, i64 d, i64 nch) {
    i64 nbytes = (d + 7) >> 3;
    for (i64 c = TID >> 5; c < nch; c += NTHREADS >> 5) {
        i64 s = c * CHUNK, n = min((i64)CHUNK, d - s);
        double acc = 0.0;
        for (i64 r = 0; r < n; r += 32) {
            i64 i = s + r + LANE;
            bool in = r + LANE < n;
            float p = 0.0f;
            if (in) {
                p = has_err ? d2f(f2d(g[i]) + f2d(err[i])) : g[i];
                if (has_err) err[i] = p;
                acc += fabs(f2d(p));
            }
            u32 v = ballot_bytes(in && nonneg(p));
            i64 o = ((s + r) >> 3) + LANE;
            if (LANE < 4 && o < nbytes) out[o] = (u8)(v >> (8 * LANE));
        }
        acc = warp_tree(acc);
        if (LANE == 0) part[c] = acc;
    }
}

extern "C" __global__ void lanesum_rows(const double* __restrict__ v, double* __restrict__ out,
                                        i64 rows, i64 len) {
    for (i64 r = TID >> 5; r < rows; r += NTHREADS >> 5) {
        double s = lanesum(v + r * len, len);
        if (LANE == 0) out[r] = s;
    }
}

extern "C" __global__ void ef_residual(float* __restrict__ err, i64 d, float scale) {
    double s = f2d(scale);
    for (i64 i = TID; i < d; i += NTHREADS) {
        float v = err[i];
        err[i] = d2f(nonneg(v) ? f2d(v) - s : f2d(v) + s);
    }
}
"""
