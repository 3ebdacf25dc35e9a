// Shared pieces of the CPU sparse kernels (spmm_cpu.cpp: fp values; spmm_int8_cpu.cpp: int8 values):
// the thread pool that runs the parts of a call, the work split, batch-tile packing of x, ISA checks.
// CPU-only: includes ATen, not CUDA.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

namespace raydistill {
namespace sparse {
namespace cpu {

constexpr int64_t kRowCost = 4;   // per-row overhead in "nonzeros" for the work split
constexpr int kRowGroup = 16;     // rows per transposed write-back group

// ---- threading ------------------------------------------------------------------------------------
// Two pools can run the parts of a call (RAYDISTILL_SPMM_POOL, read per call):
//
// * "openmp" (default): an OpenMP team through at::parallel_for, i.e. the same libgomp team that MKL and
//   oneDNN use for dense F.linear / torch.sparse. Its threads are the ones left spinning after a dense
//   call, so right after MKL they pick our parts up at once instead of competing with them for the core.
//   Parts are still claimed dynamically (atomic counter) inside the team, so a slow thread does fewer.
//   at::parallel_for honours torch.set_num_threads() and runs inline inside a parallel region.
// * "interop": the calling thread plus helper tasks on torch's inter-op pool (at::launch), no barrier.
//   Alone on a busy machine it avoids waiting for a descheduled team thread, but called right after a
//   dense MKL op its helper competes with MKL's spinning OpenMP thread for the second core: 2-2.3x slower
//   (issue 9). Kept for measurement (`raydistill bench spmm --pools`).
// RAYDISTILL_SPMM_SERIAL=1 runs every part on the calling thread.
enum class Pool { kOpenMP, kInterop, kSerial };

inline Pool current_pool() {
  const char* s = std::getenv("RAYDISTILL_SPMM_SERIAL");
  if (s && s[0] == '1') return Pool::kSerial;
  const char* e = std::getenv("RAYDISTILL_SPMM_POOL");
  if (e && std::strcmp(e, "interop") == 0) return Pool::kInterop;
  return Pool::kOpenMP;
}

// fn(p) for every p in [0, parts), on up to at::get_num_threads() threads. fn must not throw.
template <class F>
void run_parts(int64_t parts, const F& fn) {
  const int64_t nt = std::min<int64_t>(at::get_num_threads(), parts);
  const Pool pool = nt > 1 && !at::in_parallel_region() ? current_pool() : Pool::kSerial;
  if (pool == Pool::kSerial) {
    for (int64_t p = 0; p < parts; ++p) fn(p);
    return;
  }
  if (pool == Pool::kOpenMP) {
    std::atomic<int64_t> next{0};
    // one chunk of [0, nt) per team thread; each claims parts until none is left
    at::parallel_for(0, nt, 1, [&](int64_t, int64_t) {
      for (int64_t p; (p = next.fetch_add(1, std::memory_order_relaxed)) < parts;) fn(p);
    });
    return;
  }
  // kInterop: the calling thread works through the parts and nt-1 helper tasks on torch's inter-op pool
  // join in when they get scheduled. The caller waits only for parts a helper has claimed; the shared
  // state outlives the call.
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    int64_t parts = 0;
    const void* fn = nullptr;
    void (*call)(const void*, int64_t) = nullptr;
    void work() {
      for (int64_t p; (p = next.fetch_add(1, std::memory_order_relaxed)) < parts;) {
        call(fn, p);
        done.fetch_add(1, std::memory_order_acq_rel);
      }
    }
  };
  auto sh = std::make_shared<Shared>();
  sh->parts = parts;
  sh->fn = &fn;
  sh->call = [](const void* f, int64_t p) { (*static_cast<const F*>(f))(p); };
  for (int64_t i = 1; i < nt; ++i) at::launch([sh] { sh->work(); });
  sh->work();
  while (sh->done.load(std::memory_order_acquire) < parts) std::this_thread::yield();
}

// A 64-byte aligned fp32/fp64 scratch buffer (c10's CPU allocator aligns to 64 bytes), so that a packed
// x row of 16 fp32 (one cache line) is one line, not two.
template <typename acc_t>
inline at::Tensor scratch(int64_t numel) {
  return at::empty({numel}, at::TensorOptions().dtype(std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat));
}

// The row pointers of a CSR pattern of `rows` rows and `nnz` stored entries: crow[0] == 0, non-decreasing,
// crow[rows] == nnz, so that every row's range [crow[r], crow[r+1]) lies inside the column indices and
// values. O(rows) (one vectorised pass, about a microsecond for 4096 rows): every CPU op checks it before
// a kernel reads through the pattern, so a crafted crow_indices is a ValueError, never a read outside.
inline void check_row_pointers(const char* op, const int32_t* crow, int64_t rows, int64_t nnz) {
  TORCH_CHECK_VALUE(crow[0] == 0 && static_cast<int64_t>(crow[rows]) == nnz, op,
                    ": crow_indices must start at 0 and end at nnz=", nnz, ", got ", crow[0], "..", crow[rows]);
  int ok = 1;
  for (int64_t r = 0; r < rows; ++r) ok &= static_cast<int>(crow[r + 1] >= crow[r]);
  if (ok) return;
  int64_t r = 0;
  while (crow[r + 1] >= crow[r]) ++r;
  TORCH_CHECK_VALUE(false, op, ": crow_indices must be non-decreasing, got crow_indices[", r + 1, "]=", crow[r + 1],
                    " < crow_indices[", r, "]=", crow[r]);
}

inline bool use_avx512() {
  static const bool v = [] {
    if (const char* e = std::getenv("RAYDISTILL_SPMM_ISA"); e && std::strcmp(e, "avx2") == 0) return false;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
    return false;
#endif
  }();
  return v;
}

template <typename T>
inline float to_acc(T v) { return static_cast<float>(v); }
inline double to_acc(double v) { return v; }

// Row boundaries of `parts` chunks of roughly equal work sum(nnz_r + kRowCost).
inline std::vector<int64_t> balanced_rows(const int32_t* crow, int64_t rows, int64_t parts) {
  std::vector<int64_t> b(parts + 1, rows);
  b[0] = 0;
  const int64_t total = static_cast<int64_t>(crow[rows]) + kRowCost * rows;
  for (int64_t p = 1; p < parts; ++p) {
    const int64_t target = total * p / parts;
    int64_t lo = b[p - 1], hi = rows;  // first r with cost(r) >= target
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (static_cast<int64_t>(crow[mid]) + kRowCost * mid < target) lo = mid + 1; else hi = mid;
    }
    b[p] = lo;
  }
  return b;
}

// Parts for the row split; a single part (no helper threads) when the whole call is small.
inline int64_t num_parts(int64_t rows, int64_t fmas) {
  const int64_t nt = at::get_num_threads();
  if (fmas < (int64_t(1) << 18)) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(rows, nt == 1 ? 1 : nt * 8));
}

inline int pick_tile(int64_t n) {
  if (const char* e = std::getenv("RAYDISTILL_SPMM_TILE")) {
    const int t = std::atoi(e);
    if (t == 8 || t == 16 || t == 32 || t == 64) return t;
  }
  if (n <= 8) return 8;
  if (n <= 16) return 16;
  if (n <= 32) return 32;
  // Batches over 32: with 16 AVX2 registers, a 64-wide tile leaves one accumulator set (8 FMA chains
  // on one row at a time) and a packed 4096-input tile of 1 MiB, twice a 512 KiB L2. Two 32-wide tiles
  // keep two sets of 4 in flight on a 512 KiB slab: 10-20% faster at 4096x4096, batch 64, 90% sparse,
  // called right after MKL (RAYDISTILL_SPMM_TILE=64 vs 32 in one process). AVX512 hosts keep 64.
  return use_avx512() ? 64 : 32;
}

// xp[t][i][b] = x[t*T + b][i] (zero past n), for a (n, k) row-major x.
template <typename scalar_t, typename acc_t>
void pack_tiles(const scalar_t* x, int64_t n, int64_t k, int T, acc_t* xp) {
  const int64_t ntiles = (n + T - 1) / T;
  constexpr int64_t kBlk = 64;
  const int64_t kblocks = (k + kBlk - 1) / kBlk;
  auto work = [&](int64_t w) {
    const int64_t t = w / kblocks, i0 = (w % kblocks) * kBlk, i1 = std::min(k, i0 + kBlk);
    acc_t* dst = xp + t * k * T;
    for (int b = 0; b < T; ++b) {
      const int64_t nb = t * T + b;
      if (nb < n) {
        const scalar_t* src = x + nb * k;
        for (int64_t i = i0; i < i1; ++i) dst[i * T + b] = to_acc(src[i]);
      } else {
        for (int64_t i = i0; i < i1; ++i) dst[i * T + b] = acc_t(0);
      }
    }
  };
  // a few pieces per thread (each piece: several 64-column blocks)
  const int64_t nw = ntiles * kblocks;
  const int64_t pieces = std::min<int64_t>(nw, 8 * std::max<int64_t>(1, at::get_num_threads()));
  if (nw * T * kBlk < (1 << 16)) {
    for (int64_t w = 0; w < nw; ++w) work(w);
    return;
  }
  run_parts(pieces, [&](int64_t p) {
    for (int64_t w = nw * p / pieces; w < nw * (p + 1) / pieces; ++w) work(w);
  });
}
inline int64_t panel_bytes() {
  if (const char* e = std::getenv("RAYDISTILL_SPMM_PANEL_KB")) {
    const int64_t kb = std::atoll(e);
    if (kb > 0) return kb * 1024;
  }
  // One panel while a packed tile (in x T) fits in L2 (1 MiB: 4096 x 64 fp32): a row then runs through all
  // its nonzeros with the accumulators in registers. Wider inputs are split so that a panel stays in L2.
  return 1024 * 1024;
}


}  // namespace cpu
}  // namespace sparse
}  // namespace raydistill
