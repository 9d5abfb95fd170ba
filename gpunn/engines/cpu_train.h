// A stretch of plain-SGD iterations of the CPU engine, run here without returning to Python between
// them: the same calls, in the same order, on the same buffers, as engines/blas.py's _Plan makes them
// from Python (the gather, per layer the product and h, the loss, per layer (6.27a), (6.27b) and the
// folded update). Python fills the structures below once per plan; the step's arithmetic stays in
// kernels.cu and BLAS (and cpu_sparse.h for layer 1 on sparse inputs). What this saves is Python's share
// of an n_b = 100 iteration: ~15 prepared calls, the loop's bookkeeping and the next mini-batch's
// hand-over, ~0.1 ms of a ~0.7 ms step on Example 6.2.
// Included by cpu_kernels.cpp, after the functions it calls.
#pragma once

#include <cmath>
#include <cstring>

// team_gemm's arguments, as native.gemm prepares them: C ← α op(A) op(B) + β C.
struct gpunn_product {
    const void* gemm;
    long long wide, ta, tb, m, n, k;
    const REAL* A;
    long long lda;
    const REAL* B;
    long long ldb;
    REAL* C;
    long long ldc;
    REAL alpha, beta;
};

// Layer l of a plan (1 … L): Z^(l) = α Q̃^(l−1) [W b]ᵀ, then h in place (act < 0: the output layer,
// whose Z is the plan's ZL); going back, dQ → dZ by h' (6.27a), dQ^(l−1) = dZ W (6.27b, absent for
// layer 1: to_dQ_prev.gemm null) and [W b] ← [W b] − α dZᵀ Q̃ (6.27c–d with the update).
struct gpunn_layer {
    gpunn_product forward, to_dQ_prev, descend;
    REAL* Z;  // (n, U), rows ldz apart: where h runs; h' reads it back through Q = h(Z)
    REAL* dQ;  // (n, U) contiguous: the next layer's dQ, turned into this layer's dZ in place
    long long U, ldz, act;
};

// One mini-batch size's buffers: the gather's (rows → Xb beside the constant column, labels → yb, or
// the targets' rows → t), the layers, and the loss's.
struct gpunn_plan {
    long long L, n, p, ldx, task, tw, posted;  // tw: the targets' width (regression, binary); posted:
                                               // rows hold a gather a worker was handed
    const INPUT* X;
    const int* labels;  // classification, else null
    const REAL* targets;  // regression and binary: every row's targets (tw each), else null
    long long* rows;
    REAL* Xb;
    int* yb;
    REAL* t;
    gpunn_layer* layers;
    gpunn_sparse* sparse;  // not null: layer 1 works on the inputs' nonzeros (cpu_sparse.h), whose lists
                           // the gather makes instead of Xb
    REAL* WT;  // then layer 1's [W b]ᵀ, (p + 1, U) row-major (θ's memory)
    const REAL* ZL;
    const REAL* zeros;
    REAL* dZL;
    double *cost, *wrong, *out;
};

namespace {

void product(const gpunn_product& p) {
    team_gemm(p.gemm, (int)p.wide, 101, (int)p.ta, (int)p.tb, p.m, p.n, p.k, p.alpha, p.A, p.lda, p.B, p.ldb,
              p.beta, p.C, p.ldc);
}

// The plan's rows' inputs and targets (the caller has set rows), on this thread (``team``: on the team).
void gather_plan(const gpunn_plan& q, bool team = false) {
    if (q.sparse != nullptr && team) {
        team_sparse_gather(q.X, q.labels, q.rows, q.n, q.p, q.sparse, q.yb);
    } else if (q.sparse != nullptr) {
        gpunn_sparse_math::gather(q.X, q.labels, q.rows, q.p, q.sparse, q.yb, 0, q.n);
    } else if (team) {
        team_gather_rows(q.X, q.labels, q.rows, (int)q.n, (int)q.p, q.Xb, (int)q.ldx, q.yb);
    } else {
        gather_rows(q.X, q.labels, q.rows, (int)q.n, (int)q.p, q.Xb, (int)q.ldx, q.yb);
    }
    if (q.targets == nullptr) return;
    for (long long r = 0; r < q.n; ++r) {
        std::memcpy(q.t + r * q.tw, q.targets + q.rows[r] * q.tw, q.tw * sizeof(REAL));
    }
}

}  // namespace

// Iterations k = 0 … count − 1 of plain SGD, each on the n rows order[k n …] with learning rate lrs[k]
// (γ rides in dZ^(L), blas.py 4.): records[2k] = the mini-batch's mean cost J, records[2k + 1] its
// misclassified rows (NaN for regression). plans[*buffer] takes the first iteration; where ``known``
// rows of order (counted from its start) include the next iteration's, a worker gathers them into the
// other plan right after layer 1's forward pass and the next iteration uses that plan (*buffer tells the
// caller which is next). An iteration whose rows its plan already holds (posted and joined) skips its
// gather: the last iteration's hand-over serves the next call's first.
extern "C" void team_train(gpunn_plan** plans, int* buffer, const long long* order, long long count,
                           long long known, const double* lrs, double* records) {
    for (long long k = 0; k < count; ++k) {
        gpunn_plan& q = *plans[*buffer];
        const long long n = q.n, *rows = order + k * n;
        gpunn::team().join();
        if (!q.posted || std::memcmp(q.rows, rows, n * sizeof(long long)) != 0) {
            std::memcpy(q.rows, rows, n * sizeof(long long));
            gather_plan(q, true);
        }
        q.posted = 0;
        gpunn_plan* next = (k + 2) * n <= known && q.L >= 2 ? plans[1 - *buffer] : nullptr;
        for (long long l = 0; l < q.L; ++l) {
            const gpunn_layer& layer = q.layers[l];
            if (l == 0 && q.sparse != nullptr) {
                const REAL alpha = layer.forward.alpha;
                team_sparse_forward(q.sparse, n, q.p, q.WT, layer.U, alpha, layer.Z, layer.ldz, 1);
            } else {
                product(layer.forward);
            }
            if (layer.act >= 0) {
                team_activation_rows(layer.Z, (int)n, (int)layer.U, (int)layer.ldz, (int)layer.act);
            }
            if (l == 0 && next != nullptr) {  // the next mini-batch, while the layers above compute
                std::memcpy(next->rows, rows + n, n * sizeof(long long));
                next->posted = 1;
                gpunn::team().post([next] { gather_plan(*next); });
            }
        }
        const long long M = q.layers[q.L - 1].U;
        team_loss_rows(q.ZL, q.zeros, q.yb, q.t, (int)n, (int)M, (int)q.task, (REAL)lrs[k], q.dZL, q.cost,
                       q.wrong);
        sum_rows(q.cost, q.wrong, (int)n, 1.0 / (double)n, q.out);
        records[2 * k] = q.out[0];
        records[2 * k + 1] = q.task == TASK_REGRESSION ? NAN : q.out[1];
        for (long long l = q.L - 1; l >= 0; --l) {
            const gpunn_layer& layer = q.layers[l];
            if (layer.act >= 0) {
                const int U = (int)layer.U, ldz = (int)layer.ldz, act = (int)layer.act;
                team_activation_slope(layer.dQ, layer.Z, (int)n, U, ldz, act);
            }
            if (layer.to_dQ_prev.gemm != nullptr) product(layer.to_dQ_prev);
            if (l == 0 && q.sparse != nullptr) {
                team_sparse_update(q.sparse, q.p, q.WT, layer.U, layer.descend.alpha, layer.dQ);
            } else {
                product(layer.descend);
            }
        }
        if (next != nullptr) *buffer = 1 - *buffer;
    }
}
