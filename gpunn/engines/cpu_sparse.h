// Layer 1 on sparse inputs: the same products as the dense calls, α Q̃ [W b]ᵀ and [W b] ← [W b] − α dZᵀ Q̃
// (6.14, 6.27c–d with the update), with the zero inputs' terms left out. They contribute exactly nothing,
// and on MNIST 81 % of the pixels are zero: layer 1, 90 % of an iteration's arithmetic, does a fifth of
// it, at about a third of BLAS's rate per multiply-add (each weight loaded serves one row, not several).
// Which inputs are zero differs from row to row, so the work runs from lists of the nonzeros.
//
// θ holds [W b] column-major (6.17), so its transpose [W b]ᵀ is a row-major (p + 1, U) matrix whose row
// k holds the weights from input k to every unit. The forward pass adds x_rk · row k into Z's row r for
// each nonzero of row r (the gather lists them, in input order); the update subtracts α Σ_r x_rk dZ_r
// from row k for each input k (the rows where input k is nonzero, listed by the forward pass: each thread
// lists those of a block of rows). The constant column c = 1/α of Q̃ (the offsets) is input p of every
// row. Threads split the units, the columns of [W b]ᵀ, the same way in both passes, so that each keeps
// its part of [W b]ᵀ in its own cache; a thread's units go in strips of up to 8 vectors held in
// registers (64 floats or 32 doubles).
//
// Every element is summed by one thread, in input or row order: the same bits at any width of the team.
// Included by cpu_kernels.cpp (REAL, INPUT, the team's threadIdx/blockDim and my_rows).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

// The nonzeros of a mini-batch of n rows of p inputs, and c as input p of each row. By row (input,
// value): row r's from r (p + 1) on, count[r] of them. By input (row, row_value), made by the forward
// pass in ``parts``, one per thread and its block of rows r0 … r1 − 1: part t lists input k's rows from
// start[t (p + 2) + k] to start[t (p + 2) + k + 1], all from r0 (p + 1) on. Every list has room for
// n (p + 1) entries, start for Team::MOST parts.
struct gpunn_sparse {
    long long* count;
    int* input;
    REAL* value;
    long long* start;
    int* row;
    REAL* row_value;
    REAL c;
    long long parts;
};

namespace gpunn_sparse_math {

typedef REAL vec __attribute__((vector_size(32)));
const long long LANES = 32 / sizeof(REAL);
const long long VECTORS = 8;  // most per strip: 8 accumulators cover the FMA units' latency

#define GPUNN_INLINE __attribute__((always_inline)) static inline
#if defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__)  // ifunc: glibc's
// one copy for AVX2 and FMA, one for any x86-64, chosen when the module loads
#define GPUNN_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define GPUNN_CLONES
#endif

GPUNN_INLINE vec load(const REAL* p) {
    vec v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

GPUNN_INLINE void store(REAL* p, vec v) { std::memcpy(p, &v, sizeof v); }

// acc += Σ_e value[e] · source[at[e] · ld + u0 …] over entries e0 … e1 − 1 in order, V vectors of units
// from u0.
template <int V>
GPUNN_INLINE void sum_strip(vec* acc, long long e0, long long e1, const int* at, const REAL* value,
                            const REAL* source, long long ld, long long u0) {
    for (long long e = e0; e < e1; ++e) {
        const REAL* s = source + (long long)at[e] * ld + u0;
        const vec x = (vec){} + value[e];
        for (int j = 0; j < V; ++j) acc[j] += x * load(s + j * LANES);
    }
}

// The same for the w < LANES units from u0, one by one.
GPUNN_INLINE void sum_units(REAL* acc, long long w, long long e0, long long e1, const int* at,
                            const REAL* value, const REAL* source, long long ld, long long u0) {
    for (long long e = e0; e < e1; ++e) {
        const REAL* s = source + (long long)at[e] * ld + u0;
        for (long long j = 0; j < w; ++j) acc[j] += value[e] * s[j];
    }
}

// The strips that cover units u0 … u1 − 1 (a whole number of vectors, but for the last units): the
// vectors in as few strips of at most VECTORS as can be, of nearly equal width (13 vectors: 7, 6), then,
// where some units are left over, a strip of width 0 for them one by one. Strip i starts at unit
// start(i) and is width(i) vectors wide.
struct Strips {
    long long u0, u1, vectors, count;
    Strips(long long a, long long b)
        : u0(a), u1(b), vectors((b - a) / LANES), count((vectors + VECTORS - 1) / VECTORS) {}
    long long total() const { return count + (u0 + vectors * LANES < u1); }
    long long width(long long i) const {
        return i < count ? vectors * (i + 1) / count - vectors * i / count : 0;
    }
    long long start(long long i) const { return u0 + (i < count ? vectors * i / count : vectors) * LANES; }
};

// The units thread t of ``threads`` takes: whole vectors, the last thread the units left over too.
inline void my_units(long long U, long long t, long long threads, long long* u0, long long* u1) {
    const long long vectors = U / LANES;
    *u0 = vectors * t / threads * LANES;
    *u1 = t + 1 == threads ? U : vectors * (t + 1) / threads * LANES;
}

template <int V>
GPUNN_INLINE void forward_strip(const gpunn_sparse* s, long long p, const REAL* WT, long long U, long long u0,
                                REAL alpha, REAL* Z, long long ldz, long long r0, long long r1) {
    for (long long r = r0; r < r1; ++r) {
        vec acc[V] = {};
        sum_strip<V>(acc, r * (p + 1), r * (p + 1) + s->count[r], s->input, s->value, WT, U, u0);
        for (int j = 0; j < V; ++j) store(Z + r * ldz + u0 + j * LANES, acc[j] * alpha);
    }
}

// Whether input k is nonzero in any row.
GPUNN_INLINE bool listed(const gpunn_sparse* s, long long p, long long k) {
    for (long long t = 0; t < s->parts; ++t) {
        const long long* start = s->start + t * (p + 2);
        if (start[k + 1] > start[k]) return true;
    }
    return false;
}

template <int V>
GPUNN_INLINE void update_strip(const gpunn_sparse* s, long long p, REAL* WT, long long U, long long u0,
                               REAL scale, const REAL* dZ, long long k0, long long k1) {
    for (long long k = k0; k < k1; ++k) {
        if (!listed(s, p, k)) continue;  // its row of [W b]ᵀ keeps its value
        vec acc[V] = {};
        for (long long t = 0; t < s->parts; ++t) {  // the parts in order: the rows in order
            const long long* start = s->start + t * (p + 2);
            sum_strip<V>(acc, start[k], start[k + 1], s->row, s->row_value, dZ, U, u0);
        }
        REAL* w = WT + k * U + u0;
        for (int j = 0; j < V; ++j) store(w + j * LANES, load(w + j * LANES) + acc[j] * scale);
    }
}

#define GPUNN_BY_WIDTH(V, call)  \
    switch (V) {                 \
        case 8: call(8); break;  \
        case 7: call(7); break;  \
        case 6: call(6); break;  \
        case 5: call(5); break;  \
        case 4: call(4); break;  \
        case 3: call(3); break;  \
        case 2: call(2); break;  \
        default: call(1); break; \
    }

// Z[r, ua … ub − 1] = α Σ value · WT[input, ua … ub − 1] over the nonzeros of each row r < n (6.14 with
// the offsets).
GPUNN_CLONES void forward_units(const gpunn_sparse* s, long long n, long long p, const REAL* WT, long long U,
                                long long ua, long long ub, REAL alpha, REAL* Z, long long ldz) {
    const Strips strips(ua, ub);
    for (long long i = 0; i < strips.total(); ++i) {
        const long long u0 = strips.start(i);
        if (strips.width(i) == 0) {
            REAL acc[LANES];
            for (long long r = 0; r < n; ++r) {
                const long long e0 = r * (p + 1);
                std::fill(acc, acc + LANES, (REAL)0);
                sum_units(acc, ub - u0, e0, e0 + s->count[r], s->input, s->value, WT, U, u0);
                for (long long j = 0; j < ub - u0; ++j) Z[r * ldz + u0 + j] = acc[j] * alpha;
            }
            continue;
        }
#define GPUNN_FORWARD(W) forward_strip<W>(s, p, WT, U, u0, alpha, Z, ldz, 0, n)
        GPUNN_BY_WIDTH(strips.width(i), GPUNN_FORWARD)
#undef GPUNN_FORWARD
    }
}

// Part t of the lists by input: rows r0 … r1 − 1's entries, input by input, each input's in row order
// (a counting sort into the rows' own room, from r0 (p + 1) on).
inline void list_inputs(gpunn_sparse* s, long long p, long long t, long long r0, long long r1) {
    long long* start = s->start + t * (p + 2);
    std::memset(start, 0, (p + 2) * sizeof(long long));
    for (long long r = r0; r < r1; ++r) {
        for (long long e = r * (p + 1); e < r * (p + 1) + s->count[r]; ++e) ++start[s->input[e] + 1];
    }
    start[0] = r0 * (p + 1);
    for (long long k = 1; k <= p + 1; ++k) start[k] += start[k - 1];
    for (long long k = p + 1; k > 0; --k) start[k] = start[k - 1];  // each input's first free place
    for (long long r = r0; r < r1; ++r) {
        for (long long e = r * (p + 1); e < r * (p + 1) + s->count[r]; ++e) {
            const long long at = start[s->input[e] + 1]++;
            s->row[at] = (int)r;
            s->row_value[at] = s->value[e];
        }
    }
}

// WT[k, ua … ub − 1] += scale · Σ_r value · dZ[r, ua … ub − 1] over the rows listed for each input k
// (dZ (n, U) contiguous; scale = −α: 6.27c–d and the update).
GPUNN_CLONES void update_units(const gpunn_sparse* s, long long p, REAL* WT, long long U, long long ua,
                               long long ub, REAL scale, const REAL* dZ) {
    const Strips strips(ua, ub);
    for (long long i = 0; i < strips.total(); ++i) {
        const long long u0 = strips.start(i);
        if (strips.width(i) == 0) {
            REAL acc[LANES];
            for (long long k = 0; k <= p; ++k) {
                if (!listed(s, p, k)) continue;
                std::fill(acc, acc + LANES, (REAL)0);
                for (long long t = 0; t < s->parts; ++t) {
                    const long long* start = s->start + t * (p + 2);
                    sum_units(acc, ub - u0, start[k], start[k + 1], s->row, s->row_value, dZ, U, u0);
                }
                for (long long j = 0; j < ub - u0; ++j) WT[k * U + u0 + j] += acc[j] * scale;
            }
            continue;
        }
#define GPUNN_UPDATE(W) update_strip<W>(s, p, WT, U, u0, scale, dZ, 0, p + 1)
        GPUNN_BY_WIDTH(strips.width(i), GPUNN_UPDATE)
#undef GPUNN_UPDATE
    }
}

// Row r's list: the nonzeros of x (p inputs) from input k on, the e entries before kept; then c.
GPUNN_INLINE void list_rest(const INPUT* x, long long p, REAL c, int* input, REAL* value, long long* count,
                            long long e, long long k) {
    for (; k < p; ++k) {  // without branches: written, kept where nonzero
        input[e] = (int)k;
        value[e] = (REAL)x[k];
        e += x[k] != 0;
    }
    input[e] = (int)p;  // the constant column of Q̃
    value[e] = c;
    *count = e + 1;
}

#if defined(__x86_64__)
// Bytes, 32 at a time: a mask of the nonzero ones, then each set bit.
__attribute__((target("avx2,bmi"))) void list_bytes(const unsigned char* x, long long p, REAL c, int* input,
                                                    REAL* value, long long* count) {
    long long e = 0, k = 0;
    for (; k + 32 <= p; k += 32) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)(x + k));
        unsigned mask = ~(unsigned)_mm256_movemask_epi8(_mm256_cmpeq_epi8(v, _mm256_setzero_si256()));
        for (; mask != 0; mask &= mask - 1) {
            const long long i = k + __builtin_ctz(mask);
            input[e] = (int)i;
            value[e++] = (REAL)x[i];
        }
    }
    list_rest((const INPUT*)x, p, c, input, value, count, e, k);
}
#endif

inline void list_row(const INPUT* x, long long p, REAL c, int* input, REAL* value, long long* count) {
#if defined(__x86_64__)
    static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi");
    if (sizeof(INPUT) == 1 && avx2) {
        list_bytes((const unsigned char*)x, p, c, input, value, count);
        return;
    }
#endif
    list_rest(x, p, c, input, value, count, 0, 0);
}

// The lists of rows[r0 … r1 − 1] of X (n, p), and their labels into yb (where labels is not null).
inline void gather(const INPUT* X, const int* labels, const long long* rows, long long p, gpunn_sparse* s,
                   int* yb, long long r0, long long r1) {
    for (long long r = r0; r < r1; ++r) {
        if (r + 3 < r1) {  // the rows are scattered over memory: ask for one three rows ahead
            const char* ahead = (const char*)(X + rows[r + 3] * p);
            for (long long b = 0; b < p * (long long)sizeof(INPUT); b += 64) __builtin_prefetch(ahead + b);
        }
        list_row(X + rows[r] * p, p, s->c, s->input + r * (p + 1), s->value + r * (p + 1), s->count + r);
        if (labels != nullptr) yb[r] = labels[rows[r]];
    }
}

}  // namespace gpunn_sparse_math
