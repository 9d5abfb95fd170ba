// gpunn's fused CUDA kernels: one iteration of Algorithm 6.1 and the optimizer's update in a handful of
// launches (engines/fused.py launches them; the matrix products stay with cuBLAS).
//
// REAL is float or double, INPUT the stored type of the data set's inputs (unsigned char for images,
// or REAL itself for float data); both are set when the module is compiled (-DREAL=... -DINPUT=...).
// Every kernel is one thread per element, row or column, with no shared memory, no barriers and no
// atomics, so every result is the same on every run, and the same source compiles as plain C++ for the
// sequential CPU emulation in tests/cuda_emulation.py, which checks these kernels against the reference
// (layers.py, losses.py, optim.py: the one readable home of each formula copied here).
// Matrices are row-major with one data point per row, as everywhere in gpunn.
//
// Compiled as C++ for the CPU (gpunn/engines/cpu_kernels.cpp, the optional extension the package's build
// makes), the same kernels run on one "thread" that loops over everything, and the CPU engine calls
// them (loss_rows, sum_rows) with the three host functions at the end, which walk memory row by row
// as a CPU wants and apply the same h and h'.

#ifndef REAL
#define REAL float
#endif
#ifndef INPUT
#define INPUT unsigned char
#endif

#define GRID_STRIDE(i, count)                                                      \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (count); \
         i += (long long)blockDim.x * gridDim.x)

#define ACT_IDENTITY 0
#define ACT_RELU 1
#define ACT_SIGMOID 2
#define ACT_TANH 3

#define TASK_CLASSIFICATION 0
#define TASK_REGRESSION 1
#define TASK_BINARY 2

// h(z), as layers.py computes it (the sigmoid through tanh, which never overflows).
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

// The mini-batch: Xb[r, c] = X[rows[r], c] · scale (n, p) in REAL, and the targets of those rows:
// labels[rows[r]] into yb (classification, M = 0 for targets) or targets[rows[r], :] (M columns) into
// tb (regression, binary). Pass null for the kind of target the task does not have.
extern "C" __global__ void gather_batch(const INPUT* X, const int* labels, const REAL* targets,
                                        const long long* rows, int n, int p, int M, REAL scale, REAL* Xb,
                                        int* yb, REAL* tb) {
    GRID_STRIDE(i, (long long)n * p) {
        long long r = i / p, c = i % p;
        Xb[i] = (REAL)X[rows[r] * p + c] * scale;
    }
    if (labels) {
        GRID_STRIDE(r, (long long)n) { yb[r] = labels[rows[r]]; }
    } else {
        GRID_STRIDE(i, (long long)n * M) { tb[i] = targets[rows[i / M] * M + i % M]; }
    }
}

// Q = h(Z + bᵀ) in place over Z (n, U): Algorithm 6.1 lines 4 (the offset) and 5.
extern "C" __global__ void bias_activation(REAL* Z, const REAL* b, long long count, int U, int act) {
    GRID_STRIDE(i, count) { Z[i] = act_forward(Z[i] + b[i % U], act); }
}

// The cost of each row of the logits Z + bᵀ (Z (n, M) is the last product without its offset), as
// losses.py computes it, and dZ = ∂J/∂Z · scale for the mean J over n rows (6.26): one thread per row.
// cost[r] gets the row's cost (double), wrong[r] 1 where the row is misclassified (0 for regression).
//   classification (6.20, 6.26b): −z_y + ln Σ e^z;  dZ = (softmax(z) − onehot(y)) · scale / n
//   regression (6.19, 6.26a):     ‖t − z‖²;         dZ = 2 (z − t) · scale / n
//   binary:                       ln(1 + e^z) − t z; dZ = (σ(z) − t) · scale / n
extern "C" __global__ void loss_rows(const REAL* Z, const REAL* b, const int* y, const REAL* t, int n, int M,
                                     int task, REAL scale, REAL* dZ, double* cost, double* wrong) {
    GRID_STRIDE(r, (long long)n) {
        const REAL* z = Z + r * M;
        REAL* d = dZ + r * M;
        REAL factor = scale / (REAL)n;
        if (task == TASK_CLASSIFICATION) {
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
            for (int j = 0; j < M; ++j) d[j] = (d[j] / total - (j == label ? (REAL)1 : (REAL)0)) * factor;
            cost[r] = (double)log(total) - (double)(z[label] + b[label] - top);
            wrong[r] = best != label ? 1.0 : 0.0;
        } else if (task == TASK_REGRESSION) {
            double sum = 0.0;
            for (int j = 0; j < M; ++j) {
                REAL diff = z[j] + b[j] - t[r * M + j];
                d[j] = (REAL)2 * diff * factor;
                sum += (double)diff * (double)diff;
            }
            cost[r] = sum;
            wrong[r] = 0.0;
        } else {  // binary: one logit
            REAL v = z[0] + b[0];
            REAL label = t[r];
            REAL magnitude = v > (REAL)0 ? v : -v;
            cost[r] = (double)((v > (REAL)0 ? v : (REAL)0) + log1p(exp(-magnitude)) - label * v);
            d[0] = ((tanh(v * (REAL)0.5) + (REAL)1) * (REAL)0.5 - label) * factor;
            wrong[r] = (v > (REAL)0) != (label > (REAL)0.5) ? 1.0 : 0.0;
        }
    }
}

// out[0] = Σ_r cost[r] · weight and out[1] = Σ_r wrong[r], summed by one thread in row order: the same
// bits on every run (weight = 1/n for the mean over the mini-batch).
extern "C" __global__ void sum_rows(const double* cost, const double* wrong, int n, double weight,
                                    double* out) {
    GRID_STRIDE(i, 1LL) {
        double c = 0.0, w = 0.0;
        for (int r = 0; r < n; ++r) {
            c += cost[r];
            w += wrong[r];
        }
        out[0] = c * weight;
        out[1] = w;
    }
}

// dZ = dQ ⊙ h'(Z) in place over dQ (6.27a), and db_j = Σ_i dZ_ij (6.27d); one thread per column j, the
// rows summed in order. For the last layer (no h) pass act = ACT_IDENTITY: then only db is computed.
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

// SGD over the flat θ, as optim.SGD (6.23): d = g (+ λ θ where decay[i]), v ← μ v + d and d = v with
// momentum, θ ← θ − γ d. Pass any array for v when μ = 0. γ is read from device memory (step[0]), so
// that a CUDA graph replays with each iteration's own learning rate.
extern "C" __global__ void sgd_update(REAL* theta, const REAL* g, REAL* v, const unsigned char* decay,
                                      long long count, const REAL* step, REAL momentum, REAL weight_decay) {
    const REAL lr = step[0];
    GRID_STRIDE(i, count) {
        REAL d = g[i];
        if (decay[i]) d += weight_decay * theta[i];
        if (momentum != (REAL)0) {
            v[i] = momentum * v[i] + d;
            d = v[i];
        }
        theta[i] -= lr * d;
    }
}

// Adam over the flat θ, as optim.Adam: g = ∇J (+ λ θ where decay[i]), m ← β₁ m + (1 − β₁) g,
// v ← β₂ v + (1 − β₂) g², θ ← θ − step[0] · m / (√v / step[1] + ε), with step[0] = γ / (1 − β₁ᵗ) and
// step[1] = √(1 − β₂ᵗ) computed on the host for each iteration t and read from device memory.
extern "C" __global__ void adam_update(REAL* theta, const REAL* g, REAL* m, REAL* v, const unsigned char* decay,
                                       long long count, const REAL* step, REAL beta1, REAL beta2, REAL eps,
                                       REAL weight_decay) {
    const REAL step_size = step[0], correction = step[1];
    GRID_STRIDE(i, count) {
        REAL d = g[i];
        if (decay[i]) d += weight_decay * theta[i];
        m[i] = beta1 * m[i] + ((REAL)1 - beta1) * d;
        v[i] = beta2 * v[i] + ((REAL)1 - beta2) * (d * d);
        theta[i] -= step_size * (m[i] / (sqrt(v[i]) / correction + eps));
    }
}

#ifndef __CUDACC__
// --- host functions for the CPU engine (engines/blas.py), not compiled for the GPU ------------------
// The CPU engine runs each of them, and loss_rows, on a team of threads as a grid of one block
// (engines/cpu_team.h): "thread" threadIdx.x of blockDim.x takes its share of the rows.

// The rows [first, last) of n that this thread takes: a contiguous block, all n on one thread.
static inline void my_rows(long long n, long long* first, long long* last) {
    *first = n * threadIdx.x / blockDim.x;
    *last = n * (threadIdx.x + 1) / blockDim.x;
}

// Xb[r, c] = X[rows[r], c] (n rows of p, Xb's rows ldx apart: the CPU engine keeps a constant column
// beside them) and yb[r] = labels[rows[r]] (labels may be null: targets are gathered by NumPy).
extern "C" void gather_rows(const INPUT* X, const int* labels, const long long* rows, int n, int p,
                            REAL* Xb, int ldx, int* yb) {
    long long first, last;
    my_rows(n, &first, &last);
    for (long long r = first; r < last; ++r) {
        const INPUT* source = X + rows[r] * (long long)p;
        REAL* target = Xb + (long long)r * ldx;
        for (int c = 0; c < p; ++c) target[c] = (REAL)source[c];
        if (labels) yb[r] = labels[rows[r]];
    }
}

template <int ACT>
static void activation_rows_of(REAL* Z, int n, int U, int ld) {
    long long first, last;
    my_rows(n, &first, &last);
    for (long long r = first; r < last; ++r) {
        REAL* z = Z + (long long)r * ld;
        for (int j = 0; j < U; ++j) z[j] = act_forward(z[j], ACT);
    }
}

// Q = h(Z) in place over n rows of U (rows ld apart): Algorithm 6.1 line 5.
extern "C" void activation_rows(REAL* Z, int n, int U, int ld, int act) {
    if (act == ACT_RELU) activation_rows_of<ACT_RELU>(Z, n, U, ld);
    if (act == ACT_SIGMOID) activation_rows_of<ACT_SIGMOID>(Z, n, U, ld);
    if (act == ACT_TANH) activation_rows_of<ACT_TANH>(Z, n, U, ld);
}

template <int ACT>
static void activation_slope_of(REAL* dQ, const REAL* Q, int n, int U, int ldq) {
    long long first, last;
    my_rows(n, &first, &last);
    for (long long r = first; r < last; ++r) {
        REAL* d = dQ + (long long)r * U;
        const REAL* q = Q + (long long)r * ldq;
        for (int j = 0; j < U; ++j) d[j] *= act_slope(q[j], ACT);
    }
}

// dZ = dQ ⊙ h'(Z) in place over dQ (n, U), through Q = h(Z) (rows ldq apart): (6.27a).
extern "C" void activation_slope(REAL* dQ, const REAL* Q, int n, int U, int ldq, int act) {
    if (act == ACT_RELU) activation_slope_of<ACT_RELU>(dQ, Q, n, U, ldq);
    if (act == ACT_SIGMOID) activation_slope_of<ACT_SIGMOID>(dQ, Q, n, U, ldq);
    if (act == ACT_TANH) activation_slope_of<ACT_TANH>(dQ, Q, n, U, ldq);
}
#endif
