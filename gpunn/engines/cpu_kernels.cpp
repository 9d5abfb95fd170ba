// kernels.cu compiled for the CPU: the optional extension modules gpunn.engines._cpu_<REAL>_<INPUT> that
// setup.py builds (REAL, INPUT and MODULE set there). The CPU engine loads the module's file with ctypes.
//
// A kernel called directly runs as a grid of one thread that loops over everything. Called through its
// team_ form below, it runs on the module's team of threads (cpu_team.h) as a grid of one block of the
// team's width: piece p of the job is thread p, so the CUDA-style indexing of kernels.cu hands each
// thread its rows. team_gemm cuts a BLAS product the same way, into blocks of C's rows or columns, each
// a single-threaded call of the CBLAS gemm whose address the engine passes (NumPy's own BLAS).
#include <Python.h>

#include <cmath>
using std::exp;
using std::log;
using std::log1p;
using std::sqrt;
using std::tanh;

struct gpunn_cpu_dim {
    long long x;
};
static thread_local gpunn_cpu_dim threadIdx{0}, blockDim{1};  // set by each piece of a team's job
static const gpunn_cpu_dim blockIdx{0}, gridDim{1};
#define __global__
#define __device__
#define __forceinline__ inline

#include "cpu_team.h"
#include "kernels.cu"

namespace {

// A pass over fewer elements than this runs whole on the calling thread, as does a product of fewer
// multiply-adds than SMALL_PRODUCT: cut, their pieces would cost more in waking threads than they save.
// Neither joins a posted job.
const long long SMALL_PASS = 1LL << 15;
const long long SMALL_PRODUCT = 1LL << 18;
const long long LOSS_COST = 8;  // an element of the loss (exp, log, a division) costs several of h's
const long long SPARSE_ROW = 32;  // a sparse row's nonzeros, for the size of its products (at least)

// f() on every thread of the team, each as thread p of a block of ``pieces``; on this thread alone
// where the pass covers fewer than SMALL_PASS elements.
template <class F>
void on_team(long long elements, F f) {
    if (elements < SMALL_PASS) {
        f();
        return;
    }
    auto piece = [&f](int p, int pieces) {
        threadIdx.x = p;
        blockDim.x = pieces;
        f();
        threadIdx.x = 0;
        blockDim.x = 1;
    };
    gpunn::team().run(piece);
}

const long long ALIGNMENT = 16;  // blocks start on whole 16-row or 16-column tiles of C

const int ROW_MAJOR = 101, NO_TRANS = 111;

template <class Int>
using Gemm = void (*)(int, int, int, Int, Int, Int, REAL, const REAL*, Int, const REAL*, Int, REAL, REAL*, Int);

template <class Int>
void gemm_call(const void* gemm, int ta, int tb, long long m, long long n, long long k, REAL alpha,
               const REAL* A, long long lda, const REAL* B, long long ldb, REAL beta, REAL* C, long long ldc) {
    ((Gemm<Int>)gemm)(ROW_MAJOR, ta, tb, (Int)m, (Int)n, (Int)k, alpha, A, (Int)lda, B, (Int)ldb, beta, C,
                      (Int)ldc);
}

}  // namespace

// One team for every module of the process: the first module loaded gives its team's address (*team
// null), each other module takes it.
extern "C" void team_share(void** team) {
    if (*team == nullptr) {
        *team = &gpunn::team();
    } else {
        gpunn::team_pointer() = static_cast<gpunn::Team*>(*team);
    }
}

extern "C" void team_threads(int width) { gpunn::team().resize(width); }

// C ← α op(A) op(B) + β C (row-major, C m × n), as the CBLAS gemm at ``gemm`` (64-bit integers where
// ``wide``; ``order`` must be row-major) computes it, cut into one block per thread of the team: of C's
// rows where m > n, else of its columns. The blocks depend on the team's width only, so at one width
// the result repeats bit for bit (across widths BLAS may sum a block's edge in another order).
extern "C" void team_gemm(const void* gemm, int wide, int order, int ta, int tb, long long m, long long n,
                          long long k, REAL alpha, const REAL* A, long long lda, const REAL* B, long long ldb,
                          REAL beta, REAL* C, long long ldc) {
    (void)order;
    auto call = wide ? gemm_call<long long> : gemm_call<int>;
    const bool by_rows = m > n;
    const long long span = by_rows ? m : n, tiles = span / ALIGNMENT;
    if (m * n * k < SMALL_PRODUCT || tiles < 2) {
        call(gemm, ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    on_team(SMALL_PASS, [&] {
        long long first, last;
        my_rows(tiles, &first, &last);  // this thread's tiles; the last thread's takes the rest of C too
        first *= ALIGNMENT;
        last = last == tiles ? span : last * ALIGNMENT;
        if (first >= last) return;
        if (by_rows) {
            const REAL* Ap = ta == NO_TRANS ? A + first * lda : A + first;
            call(gemm, ta, tb, last - first, n, k, alpha, Ap, lda, B, ldb, beta, C + first * ldc, ldc);
        } else {
            const REAL* Bp = tb == NO_TRANS ? B + first : B + first * ldb;
            call(gemm, ta, tb, m, last - first, k, alpha, A, lda, Bp, ldb, beta, C + first, ldc);
        }
    });
}

extern "C" void team_gather_rows(const INPUT* X, const int* labels, const long long* rows, int n, int p, REAL* Xb,
                                 int ldx, int* yb) {
    on_team((long long)n * p, [&] { gather_rows(X, labels, rows, n, p, Xb, ldx, yb); });
}

// gather_rows on a worker, while the caller goes on (the CPU engine fetches the next mini-batch during
// this one's small products), until team_join; here and now where the team has no workers. The arrays
// must stay untouched until then.
extern "C" void team_gather_rows_post(const INPUT* X, const int* labels, const long long* rows, int n, int p,
                                      REAL* Xb, int ldx, int* yb) {
    gpunn::team().post([=] { gather_rows(X, labels, rows, n, p, Xb, ldx, yb); });
}

// Returns when the posted job has run.
extern "C" void team_join() { gpunn::team().join(); }

extern "C" void team_activation_rows(REAL* Z, int n, int U, int ld, int act) {
    on_team((long long)n * U, [&] { activation_rows(Z, n, U, ld, act); });
}

extern "C" void team_activation_slope(REAL* dQ, const REAL* Q, int n, int U, int ldq, int act) {
    on_team((long long)n * U, [&] { activation_slope(dQ, Q, n, U, ldq, act); });
}

extern "C" void team_loss_rows(const REAL* Z, const REAL* b, const int* y, const REAL* t, int n, int M, int task,
                               REAL scale, REAL* dZ, double* cost, double* wrong) {
    on_team((long long)n * M * LOSS_COST, [&] { loss_rows(Z, b, y, t, n, M, task, scale, dZ, cost, wrong); });
}

#include "cpu_sparse.h"

// Layer 1 on sparse inputs (cpu_sparse.h), each step on the team. The lists of rows[0 … n − 1]' nonzeros.
extern "C" void team_sparse_gather(const INPUT* X, const int* labels, const long long* rows, long long n,
                                   long long p, gpunn_sparse* s, int* yb) {
    on_team(n * p, [&] {
        long long r0, r1;
        my_rows(n, &r0, &r1);
        gpunn_sparse_math::gather(X, labels, rows, p, s, yb, r0, r1);
    });
}

// Z = α Q̃ [W b]ᵀ from the lists, WT = [W b]ᵀ ((p + 1, U) row-major, θ's own memory), the units cut over
// the team; with ``training``, each thread then lists a block of rows by input for the update.
extern "C" void team_sparse_forward(gpunn_sparse* s, long long n, long long p, const REAL* WT, long long U,
                                    REAL alpha, REAL* Z, long long ldz, int training) {
    on_team(n * U * SPARSE_ROW, [&] {
        long long u0, u1, r0, r1;
        gpunn_sparse_math::my_units(U, threadIdx.x, blockDim.x, &u0, &u1);
        gpunn_sparse_math::forward_units(s, n, p, WT, U, u0, u1, alpha, Z, ldz);
        if (!training) return;
        my_rows(n, &r0, &r1);
        gpunn_sparse_math::list_inputs(s, p, threadIdx.x, r0, r1);
        if (threadIdx.x == 0) s->parts = blockDim.x;
    });
}

// [W b]ᵀ += scale · Q̃ᵀ dZ (scale = −α) after team_sparse_forward, the units cut as there.
extern "C" void team_sparse_update(const gpunn_sparse* s, long long p, REAL* WT, long long U, REAL scale,
                                   const REAL* dZ) {
    long long entries = 0;  // in every part
    for (long long t = 0; t < s->parts; ++t) entries += s->start[t * (p + 2) + p + 1] - s->start[t * (p + 2)];
    on_team(entries * U, [&] {
        long long u0, u1;
        gpunn_sparse_math::my_units(U, threadIdx.x, blockDim.x, &u0, &u1);
        gpunn_sparse_math::update_units(s, p, WT, U, u0, u1, scale, dZ);
    });
}

#include "cpu_train.h"

#define GPUNN_CAT(a, b) a##b
#define GPUNN_INIT(name) GPUNN_CAT(PyInit_, name)
#define GPUNN_STR(x) #x
#define GPUNN_NAME(x) GPUNN_STR(x)

static struct PyModuleDef gpunn_cpu_module = {PyModuleDef_HEAD_INIT, GPUNN_NAME(MODULE),
                                              "gpunn's CUDA kernels compiled for the CPU (see engines/blas.py)",
                                              -1, nullptr};

extern "C" PyMODINIT_FUNC GPUNN_INIT(MODULE)(void) { return PyModule_Create(&gpunn_cpu_module); }
