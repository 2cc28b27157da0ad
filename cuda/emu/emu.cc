// The CUDA emulator's runtime (cuda/emu/emu.h says what it models): fibers for CUDA threads, a
// scheduler per host thread, warp collectives, the tensor-core instructions our kernels use, and
// the subset of the CUDA runtime API that cuda/backend.cu calls. Built with the kernels into
// liblora_cuda_emu.so, which the addon loads like liblora_cuda.so when LORA_NATIVE_CUDA_LIB names
// it (native/binding/cuda_loader.cc). A test tool: diagnostics go to stderr.
#include "emu.h"

#include "../../native/backend/env.h"

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <stdexcept>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

// ---- context switch (x86-64 System V) ---------------------------------------------------------
// lora_emu_switch saves the callee-saved registers, MXCSR and the x87 control word on the current
// stack, stores the stack pointer in *save and resumes the context whose stack pointer is `next`.
// A new context starts in lora_emu_trampoline with its argument in r12 and its function in r13.
extern "C" void lora_emu_switch(void** save, void* next);
extern "C" void lora_emu_trampoline();
asm(R"(
  .text
  .globl lora_emu_switch
  .hidden lora_emu_switch
  .type lora_emu_switch, @function
lora_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size lora_emu_switch, .-lora_emu_switch

  .globl lora_emu_trampoline
  .hidden lora_emu_trampoline
  .type lora_emu_trampoline, @function
lora_emu_trampoline:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size lora_emu_trampoline, .-lora_emu_trampoline
)");

namespace lora_emu {

thread_local uint3 thread_idx;
thread_local uint3 block_idx;
thread_local dim3 block_dim;
thread_local dim3 grid_dim;

namespace {

constexpr size_t kPage = 4096;
constexpr size_t kStackBytes = 64 * 1024;  // per CUDA thread; deep enough for every kernel here
constexpr int kMaxThreads = 1024;          // per block, as on every GPU we target
constexpr size_t kMaxDynamicSmem = 232448; // H100/H200 opt-in limit per block (227 KiB)
constexpr size_t kDefaultSmem = 48 * 1024; // without cudaFuncSetAttribute

// ---- errors -----------------------------------------------------------------------------------
std::mutex g_error_mu;
cudaError_t g_sticky = cudaSuccess;  // once set, every call reports it (a lost GPU context)
thread_local cudaError_t tl_last = cudaSuccess;

bool sticky_error(cudaError_t e) {
  return e == cudaErrorIllegalAddress || e == cudaErrorLaunchFailure ||
         e == cudaErrorMisalignedAddress || e == cudaErrorIllegalInstruction;
}

cudaError_t sticky() {
  std::lock_guard<std::mutex> lock(g_error_mu);
  return g_sticky;
}

cudaError_t record(cudaError_t e) {
  if (e == cudaSuccess) return e;
  tl_last = e;
  if (sticky_error(e)) {
    std::lock_guard<std::mutex> lock(g_error_mu);
    if (g_sticky == cudaSuccess) g_sticky = e;
  }
  return e;
}

// ---- fibers and the per-host-thread scheduler ---------------------------------------------------
enum class State { Ready, BlockBarrier, WarpBarrier, Done };

struct AsyncCopy {
  void* dst;
  const void* src;
  bool fill;
};

struct Fiber {
  void* sp = nullptr;
  uint3 idx{};
  int warp = 0, lane = 0;
  State state = State::Ready;
  std::vector<AsyncCopy> copies;     // cp.async issued and not yet landed, oldest first
  std::vector<size_t> group_ends;    // committed groups: end index into copies, oldest first
};

struct Warp {
  int size = 0, live = 0, arrived = 0, exited = 0;
  unsigned gen = 0;
  alignas(16) unsigned char slot[2][32][32];  // double-buffered per-lane exchange values
};

struct Job;

struct Worker {
  unsigned char* stacks = nullptr;  // kMaxThreads stacks, each below a PROT_NONE guard page
  unsigned char* smem_region = nullptr;
  size_t smem_region_bytes = 0;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  void* sched_sp = nullptr;
  Fiber* current = nullptr;
  int live = 0, block_arrived = 0;
  bool aborted = false;
  unsigned char* smem = nullptr;  // this block's dynamic shared memory
  Job* job = nullptr;
  std::vector<unsigned char> altstack;

  Worker() {
    const size_t per = kStackBytes + kPage;
    void* p = mmap(nullptr, per * kMaxThreads, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return;
    stacks = static_cast<unsigned char*>(p);
    for (int i = 0; i < kMaxThreads; ++i) mprotect(stacks + i * per, kPage, PROT_NONE);
    smem_region_bytes = (kMaxDynamicSmem + kPage - 1) / kPage * kPage;
    void* s = mmap(nullptr, smem_region_bytes + kPage, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (s == MAP_FAILED) return;
    smem_region = static_cast<unsigned char*>(s);
    mprotect(smem_region + smem_region_bytes, kPage, PROT_NONE);  // overflow faults
    fibers.resize(kMaxThreads);
    warps.resize(kMaxThreads / 32);
    altstack.resize(64 * 1024);
    stack_t ss{};
    ss.ss_sp = altstack.data();
    ss.ss_size = altstack.size();
    sigaltstack(&ss, nullptr);  // the fault handler must run even after a stack overflow
  }
  bool ok() const { return stacks != nullptr && smem_region != nullptr; }
  unsigned char* stack_top(int i) const { return stacks + (i + 1) * (kStackBytes + kPage); }
};

thread_local Worker* tl_worker = nullptr;
thread_local bool tl_in_kernel = false;

Worker* worker() {
  if (tl_worker == nullptr) tl_worker = new Worker();  // lives as long as its host thread
  return tl_worker;
}

// One launch: the blocks not yet taken, and the first error.
struct Job {
  dim3 grid, block;
  size_t smem = 0;
  const std::function<void()>* body = nullptr;
  std::atomic<uint64_t> next{0};
  uint64_t blocks = 0;
  std::atomic<bool> failed{false};
  std::mutex mu;
  cudaError_t error = cudaSuccess;
  std::string message;
  unsigned launch_number = 0;

  void fail(cudaError_t e, const std::string& what) {
    std::lock_guard<std::mutex> lock(mu);
    if (error == cudaSuccess) {
      error = e;
      message = what;
    }
    failed = true;
  }
};

std::string where(const Worker* w) {
  char buf[160];
  const Fiber* f = w->current;
  std::snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u)", block_idx.x, block_idx.y,
                block_idx.z, f ? f->idx.x : 0, f ? f->idx.y : 0, f ? f->idx.z : 0);
  return buf;
}

void yield(Worker* w, Fiber* f) { lora_emu_switch(&f->sp, w->sched_sp); }

// A fault inside a CUDA thread: the block stops here (its fibers are never resumed).
[[noreturn]] void fault(cudaError_t e, const std::string& what) {
  Worker* w = tl_worker;
  w->job->fail(e, what + " at " + where(w));
  w->aborted = true;
  yield(w, w->current);
  __builtin_unreachable();
}

void release_block(Worker* w) {
  w->block_arrived = 0;
  for (int i = 0; i < static_cast<int>(w->job->block.x * w->job->block.y * w->job->block.z); ++i)
    if (w->fibers[i].state == State::BlockBarrier) w->fibers[i].state = State::Ready;
}

void release_warp(Worker* w, int warp) {
  Warp& ws = w->warps[warp];
  ws.arrived = 0;
  ++ws.gen;
  for (int l = 0; l < ws.size; ++l) {
    Fiber& f = w->fibers[warp * 32 + l];
    if (f.state == State::WarpBarrier) f.state = State::Ready;
  }
}

void warp_barrier(Worker* w, Fiber* f) {
  Warp& ws = w->warps[f->warp];
  if (ws.exited > 0)
    fault(cudaErrorLaunchFailure,
          "a warp collective (shuffle, ldmatrix, mma) after other lanes of the warp exited");
  f->state = State::WarpBarrier;
  if (++ws.arrived == ws.live) {
    release_warp(w, f->warp);
    f->state = State::Ready;
    return;
  }
  yield(w, f);
}

extern "C" void lora_emu_fiber_main(Fiber* f) {
  Worker* w = tl_worker;
  (*w->job->body)();
  // The thread returned from the kernel: it no longer takes part in barriers.
  f->state = State::Done;
  --w->live;
  Warp& ws = w->warps[f->warp];
  --ws.live;
  ++ws.exited;
  if (ws.arrived > 0 && ws.arrived == ws.live) release_warp(w, f->warp);
  if (w->block_arrived > 0 && w->block_arrived == w->live) release_block(w);
  yield(w, f);
  __builtin_unreachable();
}

void start_fiber(Worker* w, int i) {
  Fiber& f = w->fibers[i];
  uint64_t* top = reinterpret_cast<uint64_t*>(w->stack_top(i));
  top[-1] = reinterpret_cast<uint64_t>(&lora_emu_trampoline);  // ret
  top[-2] = 0;                                                  // rbp
  top[-3] = 0;                                                  // rbx
  top[-4] = reinterpret_cast<uint64_t>(&f);                     // r12: the argument
  top[-5] = reinterpret_cast<uint64_t>(&lora_emu_fiber_main);   // r13: the function
  top[-6] = 0;                                                  // r14
  top[-7] = 0;                                                  // r15
  uint32_t* csr = reinterpret_cast<uint32_t*>(top - 9);
  __asm__ volatile("stmxcsr %0" : "=m"(csr[0]));
  csr[1] = 0x037f;  // x87 default control word
  f.sp = top - 9;
  f.state = State::Ready;
  f.copies.clear();
  f.group_ends.clear();
}

// Runs one block to completion on this host thread. False when it failed (job->error says why).
bool run_block(Worker* w, Job* job, uint64_t linear_block, unsigned launch_number) {
  const dim3 g = job->grid, b = job->block;
  block_idx.x = static_cast<unsigned>(linear_block % g.x);
  block_idx.y = static_cast<unsigned>(linear_block / g.x % g.y);
  block_idx.z = static_cast<unsigned>(linear_block / (static_cast<uint64_t>(g.x) * g.y));
  block_dim = b;
  grid_dim = g;
  const int n = static_cast<int>(b.x * b.y * b.z);
  w->job = job;
  w->live = n;
  w->block_arrived = 0;
  w->aborted = false;
  for (int i = 0; i < n; ++i) {
    start_fiber(w, i);
    Fiber& f = w->fibers[i];
    f.idx.x = static_cast<unsigned>(i % b.x);
    f.idx.y = static_cast<unsigned>(i / b.x % b.y);
    f.idx.z = static_cast<unsigned>(i / (b.x * b.y));
    f.warp = i / 32;
    f.lane = i % 32;
  }
  for (int wi = 0; wi < (n + 31) / 32; ++wi) {
    Warp& ws = w->warps[wi];
    ws.size = std::min(32, n - wi * 32);
    ws.live = ws.size;
    ws.arrived = 0;
    ws.exited = 0;
    ws.gen = 0;
  }
  if (job->smem > 0) {
    const size_t bytes = (job->smem + 15) / 16 * 16;
    w->smem = w->smem_region + w->smem_region_bytes - bytes;  // against the guard page
    std::memset(w->smem, 0xFF, bytes);  // shared memory starts as garbage on a GPU too
  } else {
    w->smem = nullptr;
  }
  tl_in_kernel = true;
  for (unsigned sweep = 0; w->live > 0; ++sweep) {
    bool ran = false;
    const bool reverse = ((sweep + launch_number) & 1u) != 0;  // vary the order between barriers
    for (int k = 0; k < n; ++k) {
      const int i = reverse ? n - 1 - k : k;
      Fiber& f = w->fibers[i];
      if (f.state != State::Ready) continue;
      w->current = &f;
      thread_idx = f.idx;
      lora_emu_switch(&w->sched_sp, f.sp);
      ran = true;
      if (w->aborted) break;
    }
    if (w->aborted) break;
    if (!ran) {
      int at_block = 0, at_warp = 0;
      for (int i = 0; i < n; ++i) {
        at_block += w->fibers[i].state == State::BlockBarrier;
        at_warp += w->fibers[i].state == State::WarpBarrier;
      }
      char buf[200];
      std::snprintf(buf, sizeof buf,
                    "deadlock in block (%u,%u,%u): %d threads wait at __syncthreads, %d at a warp "
                    "collective, %d exited",
                    block_idx.x, block_idx.y, block_idx.z, at_block, at_warp, n - w->live);
      job->fail(cudaErrorLaunchFailure, buf);
      w->aborted = true;
      break;
    }
  }
  tl_in_kernel = false;
  w->current = nullptr;
  return !w->aborted;
}

void run_blocks(Job* job) {
  Worker* w = worker();
  if (!w->ok()) {
    job->fail(cudaErrorMemoryAllocation, "the emulator could not map its fiber stacks");
    return;
  }
  for (;;) {
    if (job->failed) return;
    const uint64_t blk = job->next.fetch_add(1);
    if (blk >= job->blocks) return;
    if (!run_block(w, job, blk, job->launch_number)) return;
  }
}

// ---- host threads that run blocks ---------------------------------------------------------------
class Pool {
 public:
  Pool() {
    unsigned n = std::thread::hardware_concurrency();
    if (const char* e = ::lora::env_get("LORA_NATIVE_CUDA_EMU_THREADS", "LORA_CUDA_EMU_THREADS")) n = static_cast<unsigned>(std::atoi(e));
    n = std::max(1u, std::min(n, 8u));
    for (unsigned i = 1; i < n; ++i) threads_.emplace_back([this] { loop(); });
  }
  // Runs job on every pool thread and the caller; returns when all blocks are done.
  void run(Job* job) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_ = job;
      ++epoch_;
      busy_ = static_cast<int>(threads_.size());
    }
    cv_.notify_all();
    run_blocks(job);
    std::unique_lock<std::mutex> lock(mu_);
    done_cv_.wait(lock, [this] { return busy_ == 0; });
    job_ = nullptr;
  }

 private:
  void loop() {
    uint64_t seen = 0;
    for (;;) {
      Job* job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return epoch_ != seen; });
        seen = epoch_;
        job = job_;
      }
      run_blocks(job);
      std::lock_guard<std::mutex> lock(mu_);
      if (--busy_ == 0) done_cv_.notify_all();
    }
  }
  std::vector<std::thread> threads_;  // detached at exit: the process ends with them
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  Job* job_ = nullptr;
  uint64_t epoch_ = 0;
  int busy_ = 0;
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: its threads wait forever
  return *p;
}

std::mutex g_launch_mu;  // one stream: launches run one after another
std::atomic<unsigned> g_launches{0};
std::mutex g_attr_mu;
std::unordered_map<const void*, int> g_max_dynamic_smem;

// ---- faults inside kernels --------------------------------------------------------------------
struct sigaction g_old_segv, g_old_bus;

void on_fault(int sig, siginfo_t* info, void* ctx) {
  Worker* w = tl_worker;
  if (tl_in_kernel && w != nullptr && w->current != nullptr && w->job != nullptr) {
    char buf[96];
    std::snprintf(buf, sizeof buf, "invalid memory access (address %p)", info->si_addr);
    // Leaves the signal handler for the scheduler (SA_NODEFER keeps the signal unblocked).
    fault(cudaErrorIllegalAddress, buf);
  }
  struct sigaction& old = sig == SIGSEGV ? g_old_segv : g_old_bus;
  if (old.sa_flags & SA_SIGINFO) {
    if (old.sa_sigaction) old.sa_sigaction(sig, info, ctx);
    return;
  }
  if (old.sa_handler == SIG_IGN) return;
  if (old.sa_handler == SIG_DFL) {
    sigaction(sig, &old, nullptr);  // re-raised by the faulting instruction, with the default
    return;
  }
  old.sa_handler(sig);
}

void install_fault_handler() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa{};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_old_segv);
    sigaction(SIGBUS, &sa, &g_old_bus);
  });
}

Fiber* in_thread(const char* what) {
  Worker* w = tl_worker;
  if (w == nullptr || w->current == nullptr || !tl_in_kernel)  // host code misusing the emulator
    throw std::logic_error(std::string("lora-native CUDA emulator: ") + what + " called outside a kernel");
  return w->current;
}

uint16_t half_bits(uint32_t reg, int hi) { return static_cast<uint16_t>(hi ? reg >> 16 : reg & 0xffff); }

float b16_to_float(uint16_t bits, MmaType type) {
  if (type == MmaType::BF16) {
    const uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  __half_raw raw;
  raw.x = bits;
  return __half2float(__half(raw));
}

float tf32_value(uint32_t reg) {
  const uint32_t u = reg & 0xffffe000u;  // the tensor core reads 19 bits: sign, exponent, 10 bits
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Lets every lane of the warp see every lane's `bytes`; returns the gathered [32][32] table,
// valid until this lane's next collective.
const unsigned char (*gather(const void* in, size_t bytes))[32] {
  Worker* w = tl_worker;
  Fiber* f = in_thread("a warp collective");
  Warp& ws = w->warps[f->warp];
  const unsigned s = ws.gen & 1u;
  std::memcpy(ws.slot[s][f->lane], in, bytes);
  warp_barrier(w, f);
  return ws.slot[s];
}

}  // namespace

// ---- device-side entry points (emu.h) -----------------------------------------------------------
void syncthreads() {
  Worker* w = tl_worker;
  Fiber* f = in_thread("__syncthreads");
  f->state = State::BlockBarrier;
  if (++w->block_arrived == w->live) {
    release_block(w);
    return;
  }
  yield(w, f);
}

int lane_id() { return in_thread("a lane query")->lane; }

void warp_exchange(const void* in, void* out, size_t bytes, int src_lane) {
  const unsigned char(*table)[32] = gather(in, bytes);
  std::memcpy(out, table[src_lane & 31], bytes);
}

void* dynamic_smem() {
  in_thread("dynamic shared memory");
  return tl_worker->smem;
}

namespace {

// One warp-wide mma: gathers every lane's A (4 registers) and B (2) fragments, then this lane's D
// = A·B + C for its four outputs, c[q] at (row g + 8·(q >> 1), col 2t + (q & 1)) with g = lane / 4,
// t = lane % 4 (the C/D layout of both shapes). elem_a(table, row, k) and elem_b(table, k, col)
// read an element out of the gathered registers.
template <typename ElemA, typename ElemB>
void warp_mma(float* c, const uint32_t* a, const uint32_t* b, int K, ElemA elem_a, ElemB elem_b) {
  if (tl_worker->warps[tl_worker->current->warp].size != 32)
    fault(cudaErrorIllegalInstruction, "mma.sync in a partial warp");
  const uint32_t mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
  const unsigned char(*table)[32] = gather(mine, sizeof mine);
  const int lane = tl_worker->current->lane, g = lane >> 2, t = lane & 3;
  for (int q = 0; q < 4; ++q) {
    const int row = g + 8 * (q >> 1), col = 2 * t + (q & 1);
    double sum = 0.0;
    for (int k = 0; k < K; ++k) sum += static_cast<double>(elem_a(table, row, k)) * elem_b(table, k, col);
    c[q] = static_cast<float>(c[q] + sum);
  }
}

// Register r (0-3: A, 4-5: B) of `lane` in a gathered table.
uint32_t fragment(const unsigned char (*table)[32], int lane, int r) {
  uint32_t v;
  std::memcpy(&v, table[lane] + 4 * r, 4);
  return v;
}

}  // namespace

void mma_m16n8k16(float* c, const uint32_t* a, const uint32_t* b, MmaType type) {
  // Per the PTX ISA (mma.m16n8k16, .bf16/.f16): with g = lane / 4 and t = lane % 4,
  //   A (16x16, row):  a[i] holds (row g + 8·(i & 1), cols 2t + 8·(i >> 1) + {0, 1})
  //   B (16x8, col):   b[i] holds (rows 2t + 8·i + {0, 1}, col g)
  // the lower-numbered column/row in the low 16 bits of each register.
  warp_mma(c, a, b, 16,
           [type](const unsigned char (*table)[32], int row, int k) {
             const uint32_t reg = fragment(table, (row & 7) * 4 + ((k & 7) >> 1), (row >> 3) + 2 * (k >> 3));
             return b16_to_float(half_bits(reg, k & 1), type);
           },
           [type](const unsigned char (*table)[32], int k, int col) {
             const uint32_t reg = fragment(table, col * 4 + ((k & 7) >> 1), 4 + (k >> 3));
             return b16_to_float(half_bits(reg, k & 1), type);
           });
}

void mma_m16n8k8_tf32(float* c, const uint32_t* a, const uint32_t* b) {
  // Per the PTX ISA (mma.m16n8k8, .tf32): g = lane / 4, t = lane % 4,
  //   A (16x8, row): a[i] is (row g + 8·(i & 1), col t + 4·(i >> 1))
  //   B (8x8, col):  b[i] is (row t + 4·i, col g)
  warp_mma(c, a, b, 8,
           [](const unsigned char (*table)[32], int row, int k) {
             return tf32_value(fragment(table, (row & 7) * 4 + (k & 3), (row >> 3) + 2 * (k >> 2)));
           },
           [](const unsigned char (*table)[32], int k, int col) {
             return tf32_value(fragment(table, col * 4 + (k & 3), 4 + (k >> 2)));
           });
}

uint32_t cvt_rna_tf32(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if ((u & 0x7f800000u) == 0x7f800000u) return u & 0xffffe000u;  // inf/nan keep their class
  u += 0x1000u;  // half of the dropped 13 bits: round to nearest, ties away from zero
  return u & 0xffffe000u;
}

void ldmatrix_x4(uint32_t* r, const void* row_address, bool trans) {
  // Per the PTX ISA (ldmatrix .m8n8 .x4 .b16): lanes 8j..8j+7 give the addresses of rows 0..7 of
  // matrix j (16 bytes each, 16-byte aligned). Lane l receives in r[j]: without .trans, row l/4
  // of matrix j, elements 2(l%4) and 2(l%4)+1; with .trans, column l/4, rows 2(l%4) and 2(l%4)+1.
  if (reinterpret_cast<uintptr_t>(row_address) % 16 != 0)
    fault(cudaErrorMisalignedAddress, "ldmatrix row address not 16-byte aligned");
  const unsigned char(*table)[32] = gather(&row_address, sizeof row_address);
  const int lane = tl_worker->current->lane, g = lane >> 2, t = lane & 3;
  auto row_ptr = [&](int matrix, int row) {
    const unsigned char* p;
    std::memcpy(&p, table[matrix * 8 + row], sizeof p);
    return p;
  };
  for (int j = 0; j < 4; ++j) {
    uint16_t lo, hi;
    if (!trans) {
      std::memcpy(&lo, row_ptr(j, g) + 2 * (2 * t), 2);
      std::memcpy(&hi, row_ptr(j, g) + 2 * (2 * t + 1), 2);
    } else {
      std::memcpy(&lo, row_ptr(j, 2 * t) + 2 * g, 2);
      std::memcpy(&hi, row_ptr(j, 2 * t + 1) + 2 * g, 2);
    }
    r[j] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
}

void cp_async16(void* dst, const void* src, bool fill) {
  Fiber* f = in_thread("cp.async");
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || (fill && reinterpret_cast<uintptr_t>(src) % 16 != 0))
    fault(cudaErrorMisalignedAddress, "cp.async of 16 bytes at an address not 16-byte aligned");
  f->copies.push_back({dst, src, fill});
}

void cp_async_commit() {
  Fiber* f = in_thread("cp.async.commit_group");
  f->group_ends.push_back(f->copies.size());
}

void cp_async_wait(int newest_pending) {
  Fiber* f = in_thread("cp.async.wait_group");
  const int groups = static_cast<int>(f->group_ends.size());
  const int land = groups - newest_pending;  // the oldest `land` committed groups complete now
  if (land <= 0) return;
  const size_t end = f->group_ends[land - 1];
  for (size_t i = 0; i < end; ++i) {
    const AsyncCopy& c = f->copies[i];
    if (c.fill) std::memcpy(c.dst, c.src, 16);
    else std::memset(c.dst, 0, 16);
  }
  f->copies.erase(f->copies.begin(), f->copies.begin() + static_cast<std::ptrdiff_t>(end));
  f->group_ends.erase(f->group_ends.begin(), f->group_ends.begin() + land);
  for (size_t& e : f->group_ends) e -= end;
}

template <typename T>
T atomic_add_float(T* p, T v) {
  using U = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  U* up = reinterpret_cast<U*>(p);
  U old = __atomic_load_n(up, __ATOMIC_RELAXED);
  for (;;) {
    T f;
    std::memcpy(&f, &old, sizeof f);
    const T sum = f + v;
    U next;
    std::memcpy(&next, &sum, sizeof next);
    if (__atomic_compare_exchange_n(up, &old, next, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return f;
  }
}
float atomic_add(float* p, float v) { return atomic_add_float(p, v); }
double atomic_add(double* p, double v) { return atomic_add_float(p, v); }
int atomic_add(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
unsigned atomic_add(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }

void run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t /*stream*/,
              const std::function<void()>& body) {
  if (sticky() != cudaSuccess) {
    record(sticky());
    return;
  }
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (threads == 0 || threads > kMaxThreads || block.z > 64 || grid.x == 0 || grid.y == 0 ||
      grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    record(cudaErrorInvalidConfiguration);
    return;
  }
  size_t limit = kDefaultSmem;
  {
    std::lock_guard<std::mutex> lock(g_attr_mu);
    auto it = g_max_dynamic_smem.find(kernel);
    if (it != g_max_dynamic_smem.end()) limit = static_cast<size_t>(it->second);
  }
  if (smem > limit) {
    record(cudaErrorInvalidValue);  // what a GPU says when the kernel did not opt in
    return;
  }
  install_fault_handler();
  std::lock_guard<std::mutex> lock(g_launch_mu);
  Job job;
  job.grid = grid;
  job.block = block;
  job.smem = smem;
  job.body = &body;
  job.blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  job.launch_number = g_launches.fetch_add(1);
  // LORA_NATIVE_CUDA_EMU_FAULT_AT=n: launch number n (from 0) faults as an out-of-bounds access would,
  // so tests can drive the backend's handling of a lost GPU context.
  static const long fault_at = [] {
    const char* e = ::lora::env_get("LORA_NATIVE_CUDA_EMU_FAULT_AT", "LORA_CUDA_EMU_FAULT_AT");
    return e && *e ? std::atol(e) : -1L;
  }();
  if (fault_at >= 0 && static_cast<long>(job.launch_number) == fault_at)
    job.fail(cudaErrorIllegalAddress, "an injected fault (LORA_NATIVE_CUDA_EMU_FAULT_AT=" + std::to_string(fault_at) + ")");
  else if (job.blocks == 1) run_blocks(&job);  // no hand-off for the common tiny launch
  else pool().run(&job);
  if (job.error != cudaSuccess) {
    std::fprintf(stderr, "lora-native CUDA emulator: kernel failed: %s\n", job.message.c_str());
    record(job.error);
  }
}

// ---- memory -------------------------------------------------------------------------------------
namespace {

struct Allocation {
  void* base;
  size_t mapped;
  size_t size;
};
std::mutex g_mem_mu;
std::map<uintptr_t, Allocation> g_allocations;  // by user address
size_t g_used = 0;

size_t memory_limit() {
  static const size_t limit = [] {
    const char* e = ::lora::env_get("LORA_NATIVE_CUDA_EMU_MEMORY_MB", "LORA_CUDA_EMU_MEMORY_MB");
    const long mb = e ? std::atol(e) : 4096;
    return static_cast<size_t>(mb > 0 ? mb : 4096) << 20;
  }();
  return limit;
}

int sm_count() {
  static const int n = [] {
    const char* e = ::lora::env_get("LORA_NATIVE_CUDA_EMU_SMS", "LORA_CUDA_EMU_SMS");
    const int v = e ? std::atoi(e) : 8;
    return v > 0 ? v : 8;
  }();
  return n;
}

// True when [p, p + bytes) lies inside one device allocation.
bool is_device_range(const void* p, size_t bytes) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  std::lock_guard<std::mutex> lock(g_mem_mu);
  auto it = g_allocations.upper_bound(a);
  if (it == g_allocations.begin()) return false;
  --it;
  return a >= it->first && a - it->first + bytes <= it->second.size;
}

}  // namespace
}  // namespace lora_emu

using namespace lora_emu;

// ---- the CUDA runtime API subset cuda/backend.cu calls -----------------------------------------
extern "C" {

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}

cudaError_t cudaDriverGetVersion(int* version) {
  *version = CUDART_VERSION;  // the emulator is whatever the headers say
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : record(cudaErrorInvalidDevice); }

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return record(cudaErrorInvalidDevice);
  switch (attr) {
    case cudaDevAttrComputeCapabilityMajor: *value = 9; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = sm_count(); return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = static_cast<int>(kMaxDynamicSmem); return cudaSuccess;
    default: return record(cudaErrorInvalidValue);
  }
}

cudaError_t cudaGetLastError(void) {
  const cudaError_t s = sticky();
  if (s != cudaSuccess) return s;
  const cudaError_t e = tl_last;
  tl_last = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError(void) {
  const cudaError_t s = sticky();
  return s != cudaSuccess ? s : tl_last;
}

const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorMisalignedAddress: return "cudaErrorMisalignedAddress";
    case cudaErrorIllegalInstruction: return "cudaErrorIllegalInstruction";
    default: return "cudaErrorUnknown";
  }
}

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorMisalignedAddress: return "misaligned address";
    case cudaErrorIllegalInstruction: return "an illegal instruction was encountered";
    default: return "unknown error";
  }
}

cudaError_t cudaMalloc(void** ptr, size_t size) {
  if (sticky() != cudaSuccess) return record(sticky());
  const size_t bytes = (std::max<size_t>(size, 1) + 255) / 256 * 256;
  const size_t mapped = (bytes + kPage - 1) / kPage * kPage;
  {
    std::lock_guard<std::mutex> lock(g_mem_mu);
    if (g_used + mapped > memory_limit()) return record(cudaErrorMemoryAllocation);
    g_used += mapped;
  }
  void* base = mmap(nullptr, mapped + kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) {
    std::lock_guard<std::mutex> lock(g_mem_mu);
    g_used -= mapped;
    return record(cudaErrorMemoryAllocation);
  }
  unsigned char* b = static_cast<unsigned char*>(base);
  mprotect(b + mapped, kPage, PROT_NONE);  // reading or writing past the end faults
  unsigned char* user = b + mapped - bytes;
  std::memset(user, 0xFF, bytes);  // NaN as floats: reading unwritten memory shows
  std::lock_guard<std::mutex> lock(g_mem_mu);
  g_allocations[reinterpret_cast<uintptr_t>(user)] = {base, mapped + kPage, bytes};
  *ptr = user;
  return cudaSuccess;
}

cudaError_t cudaFree(void* ptr) {
  if (ptr == nullptr) return cudaSuccess;
  Allocation a;
  {
    std::lock_guard<std::mutex> lock(g_mem_mu);
    auto it = g_allocations.find(reinterpret_cast<uintptr_t>(ptr));
    if (it == g_allocations.end()) return record(cudaErrorInvalidValue);
    a = it->second;
    g_allocations.erase(it);
    g_used -= a.mapped - kPage;
  }
  munmap(a.base, a.mapped);
  return cudaSuccess;
}

cudaError_t cudaMallocHost(void** ptr, size_t size) {
  *ptr = std::malloc(std::max<size_t>(size, 1));
  return *ptr ? cudaSuccess : record(cudaErrorMemoryAllocation);
}

cudaError_t cudaFreeHost(void* ptr) {
  std::free(ptr);
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, cudaMemcpyKind kind,
                            cudaStream_t /*stream*/) {
  if (sticky() != cudaSuccess) return record(sticky());
  if (count == 0) return cudaSuccess;
  const bool dst_dev = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
  const bool src_dev = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
  if ((dst_dev && !is_device_range(dst, count)) || (src_dev && !is_device_range(src, count)))
    return record(cudaErrorInvalidValue);  // a host pointer where device memory belongs
  std::memmove(dst, src, count);
  return cudaSuccess;
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t count, cudaMemcpyKind kind) {
  return cudaMemcpyAsync(dst, src, count, kind, nullptr);
}

cudaError_t cudaMemsetAsync(void* dst, int value, size_t count, cudaStream_t /*stream*/) {
  if (sticky() != cudaSuccess) return record(sticky());
  if (count == 0) return cudaSuccess;
  if (!is_device_range(dst, count)) return record(cudaErrorInvalidValue);
  std::memset(dst, value, count);
  return cudaSuccess;
}

cudaError_t cudaStreamCreate(cudaStream_t* stream) {
  static int token;
  *stream = reinterpret_cast<cudaStream_t>(&token);
  return cudaSuccess;
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int /*flags*/) {
  return cudaStreamCreate(stream);
}

cudaError_t cudaStreamDestroy(cudaStream_t /*stream*/) { return cudaSuccess; }

cudaError_t cudaStreamSynchronize(cudaStream_t /*stream*/) { return sticky(); }

cudaError_t cudaDeviceSynchronize(void) { return sticky(); }

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int /*flags*/) {
  static int token;
  *event = reinterpret_cast<cudaEvent_t>(&token);
  return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t /*event*/, cudaStream_t /*stream*/) { return sticky(); }

cudaError_t cudaEventSynchronize(cudaEvent_t /*event*/) { return sticky(); }

cudaError_t cudaEventDestroy(cudaEvent_t /*event*/) { return cudaSuccess; }

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  if (value < 0 || static_cast<size_t>(value) > kMaxDynamicSmem) return record(cudaErrorInvalidValue);
  std::lock_guard<std::mutex> lock(g_attr_mu);
  g_max_dynamic_smem[func] = value;
  return cudaSuccess;
}

// Tells the addon's loader that this library is the emulator, and what device it pretends to be
// (native/binding/cuda_loader.cc: no NVIDIA driver is probed then).
__attribute__((visibility("default"))) int lora_cuda_emulator(char* name, size_t name_len, int* major,
                                                              int* minor, size_t* memory) {
  std::snprintf(name, name_len, "lora-native CUDA emulator (CPU, %d SMs)", sm_count());
  *major = 9;
  *minor = 0;
  *memory = memory_limit();
  return 0;
}

}  // extern "C"
