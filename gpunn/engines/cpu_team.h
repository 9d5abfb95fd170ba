// A team of CPU threads for the CPU engine (engines/blas.py through cpu_kernels.cpp): one job at a time,
// cut into as many pieces as the team has threads, run by the calling thread and the team's workers.
//
// Why not OpenBLAS's own threads: at n_b = 100 a product of Example 6.2 split by OpenBLAS over two
// threads ran at ~1.3 times one thread's speed, while the same product cut into two halves, each a
// single-threaded BLAS call on its own thread, ran at ~1.8 times (benchmarks/README.md). The team also
// runs the element-wise passes on every core. A job's pieces depend on the team's width only, and each
// piece is computed the same way whichever thread runs it: at one width, a result repeats bit for bit.
//
// A job can also be posted: one piece that a worker runs while the caller goes on (the CPU engine
// gathers the next mini-batch so while it does the small products of this one), joined later.
//
// Waiting: a worker spins for SPIN_MICROSECONDS after its last piece (the next job of an iteration
// comes within microseconds), then sleeps on a condition variable. The pieces are claimed, not
// assigned: the caller runs piece after piece until none is left, so a worker that is late — asleep,
// or descheduled because another process holds its core — costs no waiting unless it already took a
// piece. Only then does the caller wait, and it yields its core while it does. A fork leaves the
// workers behind; the child starts new ones at its first job.
#pragma once

#include <pthread.h>
#include <sched.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#define GPUNN_PAUSE() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define GPUNN_PAUSE() asm volatile("yield")
#else
#define GPUNN_PAUSE() ((void)0)
#endif

namespace gpunn {

class Team {
  public:
    static constexpr int MOST = 64;
    static constexpr double SPIN_MICROSECONDS = 200.0;

    // The number of threads jobs are cut for, the caller's included (1 … MOST): workers are started or
    // stopped here, never while a job runs.
    void resize(int width) {
        std::lock_guard<std::mutex> caller(caller_);
        width = width < 1 ? 1 : (width > MOST ? MOST : width);
        join_posted();
        if (width == width_ && (int)workers_.size() == width - 1) return;
        stop_workers();
        width_ = width;
        start_workers();
    }

    int width() const { return width_; }

    // piece(p, pieces) for p = 0 … pieces − 1 with pieces = width(), on the team; returns when all
    // have run (a posted job first). ``piece`` must not throw.
    template <class F>
    void run(F& piece) {
        std::lock_guard<std::mutex> caller(caller_);
        join_posted();
        if (width_ == 1 || workers_.empty()) {
            piece(0, 1);
            return;
        }
        const uint64_t generation = publish([](void* f, int p, int n) { (*static_cast<F*>(f))(p, n); }, &piece,
                                            width_);
        finish(generation);
    }

    // job() on a worker while the caller goes on, until ``join``: one job at a time, and the caller
    // runs no other job meanwhile (``run`` joins first). Without workers it runs here and now.
    void post(std::function<void()> job) {
        std::lock_guard<std::mutex> caller(caller_);
        join_posted();
        posted_ = std::move(job);
        if (width_ == 1 || workers_.empty()) {
            posted_();
            return;
        }
        posted_generation_ = publish([](void* f, int, int) { (*static_cast<std::function<void()>*>(f))(); },
                                     &posted_, 1);
    }

    // Returns when the posted job has run: here, if no worker has taken it yet.
    void join() {
        std::lock_guard<std::mutex> caller(caller_);
        join_posted();
    }

  private:
    void join_posted() {
        adopt_after_fork();
        if (posted_generation_ == 0) return;
        finish(posted_generation_);
        posted_generation_ = 0;
    }

    // Makes a job of ``pieces`` the current one and wakes the workers; returns its generation.
    uint64_t publish(void (*call)(void*, int, int), void* arg, int pieces) {
        call_ = call;
        arg_ = arg;
        pieces_ = pieces;
        done_.store(0, std::memory_order_relaxed);
        const uint64_t generation = (ticket_.load(std::memory_order_relaxed) >> 32) + 1;
        ticket_.store(generation << 32 | (uint64_t)pieces << 16, std::memory_order_seq_cst);  // publishes it
        if (sleepers_.load(std::memory_order_seq_cst) > 0) {
            std::lock_guard<std::mutex> lock(mutex_);
            wake_.notify_all();
        }
        return generation;
    }

    // The caller's end of the current job: the pieces no worker took, then the wait for the others.
    void finish(uint64_t generation) {
        claim_pieces(generation);
        wait_until([&] { return done_.load(std::memory_order_acquire) == pieces_; }, true);
    }

    // Runs unclaimed pieces of job ``generation`` until none is left. The ticket holds the job's
    // number of pieces itself, so that a claim can only succeed on an unfinished job, whose caller
    // waits for it and leaves call_ and arg_ alone meanwhile.
    void claim_pieces(uint64_t generation) {
        uint64_t ticket = ticket_.load(std::memory_order_acquire);
        for (;;) {
            const uint64_t pieces = (ticket >> 16) & 0xffffu, next = ticket & 0xffffu;
            if ((ticket >> 32) != generation || next >= pieces) return;
            if (ticket_.compare_exchange_weak(ticket, ticket + 1, std::memory_order_acq_rel)) {
                call_(arg_, (int)next, (int)pieces);
                done_.fetch_add(1, std::memory_order_acq_rel);
                ticket = ticket_.load(std::memory_order_acquire);
            }
        }
    }

    // Spins until ready(); past SPIN_MICROSECONDS, yields the core (caller) or returns false (worker).
    template <class Ready>
    bool wait_until(Ready ready, bool yield) {
        const auto start = std::chrono::steady_clock::now();
        for (int i = 1;; ++i) {
            if (ready()) return true;
            GPUNN_PAUSE();
            if (i % 64 == 0 && std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start)
                                       .count() > SPIN_MICROSECONDS) {
                if (!yield) return false;
                sched_yield();
            }
        }
    }

    void work(uint64_t seen) {
        for (;;) {
            auto next = [&] { return (ticket_.load(std::memory_order_acquire) >> 32) != seen; };
            if (!wait_until(next, false)) {
                std::unique_lock<std::mutex> lock(mutex_);
                sleepers_.fetch_add(1, std::memory_order_seq_cst);
                wake_.wait(lock, next);
                sleepers_.fetch_sub(1, std::memory_order_seq_cst);
            }
            seen = ticket_.load(std::memory_order_acquire) >> 32;
            if (stopping_.load(std::memory_order_acquire)) return;
            claim_pieces(seen);
        }
    }

    void stop_workers() {
        if (workers_.empty()) return;
        stopping_.store(true, std::memory_order_seq_cst);
        ticket_.store(((ticket_.load() >> 32) + 1) << 32, std::memory_order_seq_cst);
        {
            std::lock_guard<std::mutex> lock(mutex_);
            wake_.notify_all();
        }
        for (auto& worker : workers_) worker.join();
        workers_.clear();
        stopping_.store(false, std::memory_order_seq_cst);
    }

    // In a forked child the workers do not exist: forget them (their handles are left unjoined on
    // purpose) and start new ones at the same width. A fork is counted by the child's pthread_atfork
    // handler (``team``), so that every job need not ask the kernel for its process id.
    void adopt_after_fork() {
        const unsigned forks = forks_.load(std::memory_order_relaxed);
        if (forks == forks_seen_) return;
        forks_seen_ = forks;
        if (!workers_.empty()) {
            new std::vector<std::thread>(std::move(workers_));  // never destroyed: a joinable handle's
            workers_.clear();                                  // destructor would end the process
            new (&mutex_) std::mutex();  // a worker may have held them at the fork
            new (&wake_) std::condition_variable();
            sleepers_.store(0);
            posted_generation_ = 0;  // a posted job went with the workers: its caller joins in vain
            start_workers();
        }
    }

    void start_workers() {
        const uint64_t now = ticket_.load(std::memory_order_acquire) >> 32;  // each waits for the next job
        for (int t = 1; t < width_; ++t) workers_.emplace_back([this, now] { work(now); });
    }

    std::vector<std::thread> workers_;
    int width_ = 1;
    unsigned forks_seen_ = 0;
    std::function<void()> posted_;
    uint64_t posted_generation_ = 0;  // the posted job's, until joined
    void (*call_)(void*, int, int) = nullptr;
    void* arg_ = nullptr;
    int pieces_ = 1;  // the caller's copy
    std::atomic<uint64_t> ticket_{0};  // generation << 32 | pieces << 16 | the next unclaimed piece
    std::atomic<int> done_{0};
    std::atomic<int> sleepers_{0};
    std::atomic<bool> stopping_{false};

  public:
    std::atomic<unsigned> forks_{0};  // how often a fork made this process (counted in the child)

  private:
    std::mutex mutex_;  // for sleeping workers
    std::condition_variable wake_;
    std::mutex caller_;  // one caller at a time (threads acting as ranks share the team)
};

// The process's team: every module of the CPU kernels uses the one the first created (team_share in
// cpu_kernels.cpp passes it on). Created at first use and never destroyed (its workers may outlive
// the modules' static destructors at exit).
inline Team*& team_pointer() {
    static Team* the_team = nullptr;
    return the_team;
}

inline Team& team() {
    Team*& the_team = team_pointer();
    if (the_team == nullptr) {
        the_team = new Team();
        pthread_atfork(nullptr, nullptr,
                       [] { team_pointer()->forks_.fetch_add(1, std::memory_order_relaxed); });
    }
    return *the_team;
}

}  // namespace gpunn
