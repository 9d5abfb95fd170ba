// gpunn's fused CUDA kernels: one SGD iteration of Algorithm 6.1 in a handful of launches
// (gpunn/fused.py launches them; the matrix products stay with cuBLAS).
//
// REAL is float or double (compiled with -DREAL=...). Every kernel is one thread per element, row or
// column, with no shared memory and no barriers, so the same source also compiles as plain C++ for the
// sequential CPU emulation in tests/test_fused.py, which checks these kernels against the reference.
// Matrices are row-major with one data point per row, as everywhere in gpunn.

#ifndef REAL
#define REAL float
#endif

#define GRID_STRIDE(i, count)                                                      \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (count); \
         i += (long long)blockDim.x * gridDim.x)

#define ACT_IDENTITY 0
#define ACT_RELU 1
#define ACT_SIGMOID 2
#define ACT_TANH 3

// h(z), as gpunn/layers.py computes it (the sigmoid through tanh, which never overflows).
__device__ __forceinline__ REAL act_forward(REAL z, int act) {
    if (act == ACT_RELU) return z > (REAL)0 ? z : (REAL)0;
    if (act == ACT_SIGMOID) return (tanh(z * (REAL)0.5) + (REAL)1) * (REAL)0.5;
    if (act == ACT_TANH) return tanh(z);
    return z;
}

// h'(z) written through q = h(z), so backward never re-evaluates h.
__device__ __forceinline__ REAL act_slope(REAL q, int act) {
    if (act == ACT_RELU) return q > (REAL)0 ? (REAL)1 : (REAL)0;
    if (act == ACT_SIGMOID) return q * ((REAL)1 - q);
    if (act == ACT_TANH) return (REAL)1 - q * q;
    return (REAL)1;
}

// The mini-batch: Xb[r, c] = X[rows[r], c] / 255 (n, p) and yb[r] = labels[rows[r]].
extern "C" __global__ void gather_batch(const unsigned char* X, const int* labels, const long long* rows,
                                        int n, int p, REAL* Xb, int* yb) {
    GRID_STRIDE(i, (long long)n * p) {
        long long r = i / p, c = i % p;
        long long src = rows[r];
        Xb[i] = (REAL)X[src * p + c] * (REAL)(1.0 / 255.0);
        if (c == 0) yb[r] = labels[src];
    }
}

// Q = h(Z + bᵀ) in place over Z (n, U): Algorithm 6.1 lines 4 (the bias) and 5.
extern "C" __global__ void bias_activation(REAL* Z, const REAL* b, long long count, int U, int act) {
    GRID_STRIDE(i, count) { Z[i] = act_forward(Z[i] + b[i % U], act); }
}

// dZ = dQ ⊙ h'(Z) in place over dQ (6.27a), and db_j = Σ_i dZ_ij (6.27d); one thread per column j.
// For the last layer (no h) pass act = ACT_IDENTITY: then only db is computed.
extern "C" __global__ void activation_backward(REAL* dQ, const REAL* Q, int n, int U, int act, REAL* db) {
    GRID_STRIDE(j, (long long)U) {
        REAL sum = (REAL)0;
        for (int r = 0; r < n; ++r) {
            long long k = (long long)r * U + j;
            REAL dz = act == ACT_IDENTITY ? dQ[k] : dQ[k] * act_slope(Q[k], act);
            dQ[k] = dz;
            sum += dz;
        }
        db[j] = sum;
    }
}

// Softmax cross-entropy of the logits Z + bᵀ (Z (n, M) is the last product without its bias):
// dZ = (softmax − onehot(y)) · scale / n (6.26b), and out[0] += the mean cost (6.20),
// out[1] += the number of misclassified rows. One thread per row; out must start at zero.
extern "C" __global__ void softmax_cross_entropy(const REAL* Z, const REAL* b, const int* y, int n, int M,
                                                 REAL scale, REAL* dZ, double* out) {
    GRID_STRIDE(r, (long long)n) {
        const REAL* z = Z + r * M;
        REAL* d = dZ + r * M;
        REAL top = z[0] + b[0];
        int best = 0;
        for (int j = 1; j < M; ++j) {
            REAL v = z[j] + b[j];
            if (v > top) {
                top = v;
                best = j;
            }
        }
        REAL total = (REAL)0;
        for (int j = 0; j < M; ++j) {
            REAL e = exp(z[j] + b[j] - top);
            d[j] = e;
            total += e;
        }
        int label = y[r];
        REAL factor = scale / (REAL)n;
        for (int j = 0; j < M; ++j) d[j] = (d[j] / total - (j == label ? (REAL)1 : (REAL)0)) * factor;
        double cost = (double)(log(total) - (z[label] + b[label] - top));
        atomicAdd(&out[0], cost / n);
        atomicAdd(&out[1], best != label ? 1.0 : 0.0);
    }
}

// SGD over the flat θ (6.23): d = g (+ λ θ where decay[i]), v ← μ v + d and d = v with momentum,
// θ ← θ − γ d. Without decay or momentum, pass any arrays for decay/v with the flag at 0. γ is read
// from device memory (lr[0]), so that a CUDA graph replays with each step's own learning rate.
extern "C" __global__ void sgd_update(REAL* theta, const REAL* g, REAL* v, const unsigned char* decay,
                                      long long count, const REAL* lr_at, REAL momentum, REAL weight_decay,
                                      int use_momentum, int use_decay) {
    const REAL lr = lr_at[0];
    GRID_STRIDE(i, count) {
        REAL d = g[i];
        if (use_decay && decay[i]) d += weight_decay * theta[i];
        if (use_momentum) {
            v[i] = momentum * v[i] + d;
            d = v[i];
        }
        theta[i] -= lr * d;
    }
}
