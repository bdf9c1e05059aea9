// Float32 GEMMs for XLA:CPU through a BLAS loaded at run time (nnbase/blas.py).
//
// One XLA FFI handler, `NnbaseSgemm`: out[i] = op(a[i]) @ op(b[i]) for rank-3
// operands (a batch of products; batch 1 for a plain product). The work is
// cut into parts (one per product of a batch, else slabs of the larger of M
// and N) that XLA's intra-op threads and the calling thread claim one at a
// time, each part a single-threaded `cblas_sgemm`. The BLAS runs sequential
// (MKL's threading layer is set so) so that its threads never compete with
// XLA's own.
//
// Built by nnbase/blas.py with the C++ compiler against jax.ffi.include_dir().

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// cblas_sgemm(order, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc).
using SgemmFn = void (*)(int, int, int, int, int, int, float, const float*, int, const float*,
                         int, float, float*, int);
SgemmFn g_sgemm = nullptr;

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

struct Work {
  const float* a;
  const float* b;
  float* c;
  int64_t m, n, k, lda, ldb, ldc, stride_a, stride_b, stride_c;
  bool trans_a, trans_b, split_m;
  int64_t pieces, step, count;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  // Part i: product i / pieces, slab i % pieces (rows of C if split_m, else columns).
  void Run(int64_t i) const {
    const int64_t item = i / pieces, lo = (i % pieces) * step;
    const float* pa = a + item * stride_a;
    const float* pb = b + item * stride_b;
    float* pc = c + item * stride_c;
    int64_t m_part = m, n_part = n;
    if (split_m) {
      m_part = std::min(step, m - lo);
      pa += trans_a ? lo : lo * lda;
      pc += lo * ldc;
    } else {
      n_part = std::min(step, n - lo);
      pb += trans_b ? lo * ldb : lo;
      pc += lo;
    }
    g_sgemm(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans,
            static_cast<int>(m_part), static_cast<int>(n_part), static_cast<int>(k), 1.0f, pa,
            static_cast<int>(lda), pb, static_cast<int>(ldb), 0.0f, pc, static_cast<int>(ldc));
  }

  void Drain() {
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < count;) {
      Run(i);
      done.fetch_add(1, std::memory_order_acq_rel);
    }
  }
};

ffi::Error Sgemm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                 ffi::ResultBuffer<ffi::F32> out, bool trans_a, bool trans_b, int64_t min_part_flops) {
  if (g_sgemm == nullptr) return ffi::Error::Internal("nnbase_sgemm: no BLAS is loaded");
  auto da = a.dimensions(), db = b.dimensions(), dc = out->dimensions();
  if (da.size() != 3 || db.size() != 3 || dc.size() != 3)
    return ffi::Error::InvalidArgument("nnbase_sgemm: operands must be rank 3");
  const int64_t batch = dc[0], m = dc[1], n = dc[2];
  const int64_t k = trans_a ? da[1] : da[2];
  if (da[0] != batch || db[0] != batch || (trans_a ? da[2] : da[1]) != m ||
      (trans_b ? db[2] : db[1]) != k || (trans_b ? db[1] : db[2]) != n)
    return ffi::Error::InvalidArgument("nnbase_sgemm: operand shapes do not match");
  if (std::max({m, n, k, da[2], db[2]}) > INT_MAX)
    return ffi::Error::InvalidArgument("nnbase_sgemm: a dimension exceeds the BLAS's int");
  float* c = out->typed_data();
  if (batch == 0 || m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    std::memset(c, 0, sizeof(float) * batch * m * n);
    return ffi::Error::Success();
  }

  auto work = std::make_shared<Work>();
  Work& w = *work;
  w.a = a.typed_data();
  w.b = b.typed_data();
  w.c = c;
  w.m = m;
  w.n = n;
  w.k = k;
  w.lda = da[2];
  w.ldb = db[2];
  w.ldc = n;
  w.stride_a = da[1] * da[2];
  w.stride_b = db[1] * db[2];
  w.stride_c = m * n;
  w.trans_a = trans_a;
  w.trans_b = trans_b;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t flops = 2 * m * n * k;
  w.split_m = m >= n;
  w.pieces = 1;
  if (batch < threads && flops >= 2 * min_part_flops) {
    // Slabs of at least 16 rows or columns, at most one per thread per product.
    const int64_t len = w.split_m ? m : n;
    const int64_t want = std::min({(threads + batch - 1) / batch, flops / min_part_flops,
                                   std::max<int64_t>(1, len / 16)});
    w.pieces = std::max<int64_t>(1, want);
  }
  const int64_t len = w.split_m ? m : n;
  w.step = (len + w.pieces - 1) / w.pieces;
  w.pieces = (len + w.step - 1) / w.step;
  w.count = batch * w.pieces;

  const int64_t helpers = std::min(w.count - 1, threads);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->Drain(); });
  w.Drain();
  // Parts claimed by helpers may still run; they finish without blocking.
  while (w.done.load(std::memory_order_acquire) < w.count) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

// Loads `symbol` (a cblas_sgemm) from the shared library at `path`. With
// mkl_layer >= 0, MKL's threading layer is set to it first (1: sequential).
// Returns 0 on success, 1 when the library does not load, 2 without the symbol.
extern "C" int nnbase_blas_load(const char* path, const char* symbol, int mkl_layer) {
  void* handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) return 1;
  if (mkl_layer >= 0) {
    auto set_layer = reinterpret_cast<int (*)(int)>(dlsym(handle, "MKL_Set_Threading_Layer"));
    if (set_layer != nullptr) set_layer(mkl_layer);
  }
  auto fn = reinterpret_cast<SgemmFn>(dlsym(handle, symbol));
  if (fn == nullptr) return 2;
  g_sgemm = fn;
  return 0;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(NnbaseSgemm, Sgemm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b")
                                  .Attr<int64_t>("min_part_flops"));
