// The CPU GEMM engine's blocking, chosen once per process from the CPU it runs on: the cache sizes
// from cpuid (sysconf, then defaults, where cpuid says nothing or nonsense) and the FMA pipes
// counted by timing a burst of independent FMAs against a chain of 1-cycle integer adds. Nothing
// here is tuned to one machine: each block is a fraction of a cache, derived below.
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <unistd.h>

#include "gemm_isa.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif

namespace lora {

namespace {

int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : v > hi ? hi : v; }
int64_t pow2_floor(int64_t v) {
  int64_t p = 1;
  while (p * 2 <= v) p *= 2;
  return p;
}
int64_t online_cores() {
  const long n = sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? n : 1;
}

struct Caches {
  int64_t l1d = 0, l2 = 0, l3 = 0;  // bytes; l3 already divided among the cores sharing it
  const char* source = "default";
};

#if defined(__x86_64__) && defined(__GNUC__)
// Leaf 4 (Intel) and leaf 0x8000001D (AMD, with topology extensions) describe each cache alike:
// type, level, how many logical processors share it, and its geometry.
bool cpuid_cache_leaf(unsigned leaf, Caches* c) {
  bool any = false;
  for (unsigned i = 0; i < 16; ++i) {
    unsigned a, b, cx, d;
    if (!__get_cpuid_count(leaf, i, &a, &b, &cx, &d)) return any;
    const unsigned type = a & 31, level = (a >> 5) & 7;
    if (type == 0) break;
    if (type != 1 && type != 3) continue;  // data or unified caches only
    const int64_t size = int64_t((b >> 22) + 1) * (((b >> 12) & 0x3ff) + 1) * ((b & 0xfff) + 1) * (cx + 1);
    const int64_t sharing = ((a >> 14) & 0xfff) + 1;
    if (level == 1) c->l1d = size;
    if (level == 2) c->l2 = size;
    if (level == 3) c->l3 = size / clamp64(sharing, 1, online_cores());
    any = true;
  }
  return any;
}

bool cpuid_caches(Caches* c) {
  unsigned a, b, cx, d;
  if (!__get_cpuid(0, &a, &b, &cx, &d)) return false;
  const unsigned max_leaf = a;
  const bool amd = b == 0x68747541;  // "Auth"enticAMD
  unsigned ext = 0;
  if (__get_cpuid(0x80000000, &a, &b, &cx, &d)) ext = a;
  if (!amd && max_leaf >= 4 && cpuid_cache_leaf(4, c) && c->l1d && c->l2) return true;
  if (amd && ext >= 0x8000001D && __get_cpuid(0x80000001, &a, &b, &cx, &d) && (cx & (1u << 22)) &&
      cpuid_cache_leaf(0x8000001D, c) && c->l1d && c->l2)
    return true;
  // AMD's legacy leaves: L1d in KB, L2 in KB, L3 in 512 KB units shared by all cores (as far as
  // this leaf says)
  if (amd && ext >= 0x80000006) {
    __get_cpuid(0x80000005, &a, &b, &cx, &d);
    c->l1d = int64_t(cx >> 24) << 10;
    __get_cpuid(0x80000006, &a, &b, &cx, &d);
    c->l2 = int64_t(cx >> 16) << 10;
    c->l3 = (int64_t(d >> 18) << 19) / online_cores();
    return c->l1d && c->l2;
  }
  return false;
}
#endif

Caches detect_caches() {
  Caches c;
#if defined(__x86_64__) && defined(__GNUC__)
  if (cpuid_caches(&c)) c.source = "cpuid";
#endif
#ifdef _SC_LEVEL1_DCACHE_SIZE
  if (!c.l1d || !c.l2) {
    const long l1 = sysconf(_SC_LEVEL1_DCACHE_SIZE), l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
    if (l1 > 0 && l2 > 0) {
      c.l1d = l1;
      c.l2 = l2;
      c.l3 = l3 > 0 ? l3 / online_cores() : 0;
      c.source = "sysconf";
    }
  }
#endif
  // Hypervisors report what they like (this project's VMs: a 508 MB L3): keep each level within
  // what real cores have had, and fall back to a common core (32 KB, 512 KB, 2 MB) where unknown.
  c.l1d = c.l1d ? clamp64(c.l1d, 16 << 10, 256 << 10) : 32 << 10;
  c.l2 = c.l2 ? clamp64(c.l2, 128 << 10, 4 << 20) : 512 << 10;
  c.l3 = c.l3 ? clamp64(c.l3, 512 << 10, 8 << 20) : 2 << 20;
  return c;
}

#if defined(__x86_64__) && defined(__GNUC__)
double seconds_of(void (*fn)(int64_t), int64_t n) {
  const auto t0 = std::chrono::steady_clock::now();
  fn(n);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
// n dependent integer adds: n cycles on every x86 core (one-cycle add latency since the P6).
void add_chain(int64_t n) {
  uint64_t x = 0;
  for (int64_t i = 0; i < n; i += 16) __asm__ volatile(".rept 16\n\taddq $1, %0\n\t.endr" : "+r"(x));
}
const IsaTable* g_probe_table = nullptr;
volatile float g_probe_sink;
void fma_run(int64_t iters) { g_probe_sink = g_probe_table->fma_burst(iters); }

// FMA instructions retired per cycle: the best of a few interleaved tries of each (a try that
// was descheduled only reads slower).
double measure_fmas_per_cycle(const IsaTable& t) {
  if (!t.fma_burst) return 0.0;
  g_probe_table = &t;
  const int64_t adds = 1 << 18, iters = 1 << 13;  // ~80 µs and ~30-60 µs at 3 GHz
  double best_add = 1e30, best_fma = 1e30;
  for (int r = 0; r < 7; ++r) {
    const double a = seconds_of(add_chain, adds), f = seconds_of(fma_run, iters);
    if (a < best_add) best_add = a;
    if (f < best_fma) best_fma = f;
  }
  const double cycles_per_second = adds / best_add;
  return 24.0 * iters / best_fma / cycles_per_second;
}
#else
double measure_fmas_per_cycle(const IsaTable&) { return 0.0; }
#endif

bool parse_blocks_env(int64_t* kc, int64_t* mc, int64_t* nc) {
  const char* env = std::getenv("LORA_NATIVE_GEMM_BLOCKS");
  if (!env) return false;
  char* end = nullptr;
  const long long a = std::strtoll(env, &end, 10);
  if (*end != ',') return false;
  const long long b = std::strtoll(end + 1, &end, 10);
  if (*end != ',') return false;
  const long long c = std::strtoll(end + 1, &end, 10);
  if (*end != '\0' || a < 1 || b < 1 || c < 1) return false;
  *kc = a;
  *mc = b;
  *nc = c;
  return true;
}

GemmBlocking choose_blocking() {
  const IsaTable& t = isa_table();
  const Caches c = detect_caches();
  GemmBlocking b{};
  b.l1d = c.l1d;
  b.l2 = c.l2;
  b.l3 = c.l3;
  b.cache_source = c.source;
  b.fmas_per_cycle = measure_fmas_per_cycle(t);
  // one or two FMA units (an AVX-512 core that downclocks for the FMAs still reads above 1.5)
  b.fma_pipes = b.fmas_per_cycle >= 1.5 ? 2 : 1;
  const int64_t nr = t.wide.nr, lanes = t.wide.nr1;
  // kc: the B micro-panel (kc x nr) streams through L2 beside the A block, an eighth of L2 (long
  // k loops halve the loads and stores of C per flop; 1 MB L2 -> 1024, measured best on Zen 4 and
  // Zen 5 alike). A power of two up to 1024.
  b.kc = clamp64(pow2_floor(b.l2 / 8 / (nr * 4)), 128, 1024);
  // mc: the packed (mc x kc) A block fills 9/16 of L2, in multiples of 24 (every kernel's mr
  // divides 24). 1 MB L2 -> 144 rows.
  b.mc = clamp64(b.l2 * 9 / 16 / (b.kc * 4) / 24 * 24, 24, 4096);
  // nc: the packed (kc x nc) B block is this core's share of L3, swept by every A block.
  b.nc = clamp64(b.l3 / (b.kc * 4), 96, 8192);
  int64_t kc, mc, nc;
  if (parse_blocks_env(&kc, &mc, &nc)) {
    b.kc = kc;
    b.mc = mc;
    b.nc = nc;
    b.cache_source = "env";
  }
  // small_kc: 8 rows of x repacked for the streaming path use two thirds of L1d (48 KB -> 1024).
  b.small_kc = clamp64(b.l1d * 2 / 3 / (8 * 4) / 64 * 64, 64, 4096);
  // A second thread is worth waking for about 5 µs of one core's work at its peak: 16384 cycles of
  // fma_pipes x lanes multiply-adds.
  b.parallel_min_flops = 16384 * (b.fma_pipes ? b.fma_pipes : 1) * lanes;
  return b;
}

GemmBlocking& blocking_storage() {
  static GemmBlocking b = choose_blocking();
  return b;
}

}  // namespace

const GemmBlocking& gemm_blocking() { return blocking_storage(); }
void set_gemm_blocking_for_dev(const GemmBlocking& b) { blocking_storage() = b; }

}  // namespace lora
