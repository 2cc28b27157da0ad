// A small persistent thread pool for the CPU kernels: run(fn) calls fn(tid, nthreads) on every
// worker (the caller is worker 0) and returns when all are done. Workers sleep between jobs, after
// spinning briefly: decode runs hundreds of small parallel kernels back to back, and a wake-up
// through the condition variable costs more than such a kernel (tens of µs on a VM). One pool per
// addon instance (worker_threads each get their own); it is not a task scheduler.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace lora {

class ThreadPool {
 public:
  explicit ThreadPool(int threads) { resize(threads); }
  ~ThreadPool() { stop_workers(); }
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return size_; }

  // Changes the number of threads (>= 1). Not to be called while a job runs.
  void resize(int threads) {
    threads = std::max(1, threads);
    if (threads == size_) return;
    stop_workers();
    size_ = threads;
    stopping_ = false;
    // New workers start at the current generation: a job that already ran is not theirs to run.
    const uint64_t gen = generation_.load();
    for (int t = 1; t < size_; ++t) workers_.emplace_back([this, t, gen] { worker_loop(t, gen); });
  }

  // fn(tid, nthreads) on every thread; nested calls from inside a job run serially.
  void run(const std::function<void(int, int)>& fn) {
    if (size_ == 1 || in_job()) {
      fn(0, 1);
      return;
    }
    {
      std::unique_lock<std::mutex> lock(mu_);
      job_ = &fn;
      pending_.store(size_ - 1, std::memory_order_relaxed);
      generation_.store(generation_.load(std::memory_order_relaxed) + 1, std::memory_order_release);
      // a worker that sleeps needs the notify; a spinning one sees the generation change
      if (sleepers_ > 0) cv_start_.notify_all();
    }
    in_job() = true;
    fn(0, size_);
    in_job() = false;
    // the workers usually finish within the spin: then no lock and no futex
    if (!spin_until([this] { return pending_.load(std::memory_order_acquire) == 0; })) {
      std::unique_lock<std::mutex> lock(mu_);
      cv_done_.wait(lock, [this] { return pending_.load(std::memory_order_acquire) == 0; });
    }
    std::unique_lock<std::mutex> lock(mu_);
    job_ = nullptr;
  }

  // Splits [0, n) into contiguous chunks, one per thread: fn(begin, end). Small n stays on the
  // calling thread (grain = the least work worth waking a thread for).
  void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
    if (n <= 0) return;
    if (size_ == 1 || n <= grain) {
      fn(0, n);
      return;
    }
    run([&](int tid, int nt) {
      int64_t chunk = (n + nt - 1) / nt;
      int64_t b = std::min<int64_t>(n, tid * chunk), e = std::min<int64_t>(n, b + chunk);
      if (b < e) fn(b, e);
    });
  }

 private:
  // Spins on ready() for up to kSpin; true when it became true meanwhile.
  template <typename F>
  static bool spin_until(F ready) {
    // 300 µs: longer than the gaps between the parallel kernels of a decode step (attention of one
    // row on one thread, rope, the cache copies and the TypeScript between them ran past the 50 µs
    // this was: SmolLM2 bf16 decode made ~100 futex calls per step, now ~10, and a 576 x 576 GEMV
    // after a 100 µs gap took 39.5 µs against 19.8 back to back), short enough that an idle pool
    // gives its cores back soon (it yields between checks meanwhile)
    constexpr auto kSpin = std::chrono::microseconds(300);
    const auto end = std::chrono::steady_clock::now() + kSpin;
    for (int i = 0;; ++i) {
      if (ready()) return true;
      if (i < 256) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
        continue;
      }
      // past a few µs, yield between checks: on a busy machine the thread we wait for may need
      // this core (a bare spin would hold it for the whole kSpin)
      if (std::chrono::steady_clock::now() >= end) return false;
      std::this_thread::yield();
    }
  }

  void worker_loop(int tid, uint64_t seen) {
    for (;;) {
      const std::function<void(int, int)>* job;
      spin_until([&] { return generation_.load(std::memory_order_acquire) != seen; });
      {
        std::unique_lock<std::mutex> lock(mu_);
        ++sleepers_;
        cv_start_.wait(lock, [&] { return stopping_ || generation_.load(std::memory_order_relaxed) != seen; });
        --sleepers_;
        if (stopping_) return;
        seen = generation_.load(std::memory_order_relaxed);
        job = job_;
      }
      in_job() = true;
      (*job)(tid, size_);
      in_job() = false;
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        // the caller may be asleep on cv_done_: notify under the lock so the wake is not lost
        std::unique_lock<std::mutex> lock(mu_);
        cv_done_.notify_one();
      }
    }
  }

  void stop_workers() {
    {
      std::unique_lock<std::mutex> lock(mu_);
      stopping_ = true;
    }
    cv_start_.notify_all();
    for (auto& w : workers_) w.join();
    workers_.clear();
  }

  // True on a thread while it runs a job of any pool, so nested parallel calls run serially.
  static bool& in_job() {
    static thread_local bool flag = false;
    return flag;
  }

  int size_ = 0;
  bool stopping_ = false;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  int sleepers_ = 0;  // workers waiting on cv_start_ (guarded by mu_)
  const std::function<void(int, int)>* job_ = nullptr;
  std::mutex mu_;
  std::condition_variable cv_start_, cv_done_;
  std::vector<std::thread> workers_;
};

}  // namespace lora
