// Float32 GEMMs for XLA:CPU through a BLAS loaded at run time (nnbase/blas.py).
//
// One XLA FFI handler, `NnbaseSgemm`: out[i] = op(a[i]) @ op(b[i]) over the
// leading (batch) axes of operands of rank >= 3; a leading axis of size 1 in
// a or b is broadcast (what jax.vmap's "expand_dims" method passes). The work is
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
#include <vector>

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
  int64_t m, n, k, lda, ldb, ldc, stride_c;
  std::vector<int64_t> offset_a, offset_b;  // per product of the batch
  bool trans_a, trans_b, split_m;
  int64_t pieces, step, count;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  // Part i: product i / pieces, slab i % pieces (rows of C if split_m, else columns).
  void Run(int64_t i) const {
    const int64_t item = i / pieces, lo = (i % pieces) * step;
    const float* pa = a + offset_a[item];
    const float* pb = b + offset_b[item];
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

// How a product is cut: slabs of C's rows (split_m) or columns, `pieces`
// slabs of `step` rows or columns each (the last may be shorter).
struct Plan {
  bool split_m;
  int64_t pieces, step;
};

// A product of a batch smaller than the thread count, of at least
// 2 * min_part_flops, is cut into at most one slab per thread per product,
// each of at least 16 rows or columns. The cut runs along the side whose
// operand slab is contiguous in memory (rows of A for M unless A is
// transposed; rows of B^T for N when B is transposed), along the longer side
// where both or neither are or where the other side is 8x longer, and along
// the other side where the chosen one is too short to give as many slabs.
// On a 2-core Xeon (docs/design.md, "Which side of a product is cut"):
// [128, 784] @ [784, 400] ran 1.12-1.15x as fast cut by rows as by columns,
// [128, 784] @ [400, 784]^T 1.14x by columns, and [196, 256] @ [256, 2048]
// 1.21x by columns.
Plan MakePlan(int64_t m, int64_t n, int64_t k, bool trans_a, bool trans_b, int64_t batch,
              int64_t threads, int64_t min_part_flops) {
  const int64_t flops = 2 * m * n * k;
  auto pieces = [&](int64_t len) -> int64_t {
    if (batch >= threads || flops < 2 * min_part_flops) return 1;
    return std::min({(threads + batch - 1) / batch, flops / min_part_flops,
                     std::max<int64_t>(1, len / 16)});
  };
  const bool contiguous_m = !trans_a, contiguous_n = trans_b;
  bool split_m = contiguous_m != contiguous_n ? contiguous_m : m >= n;
  if (split_m ? n >= 8 * m : m >= 8 * n) split_m = !split_m;
  if (pieces(split_m ? m : n) < pieces(split_m ? n : m)) split_m = !split_m;
  const int64_t len = split_m ? m : n, parts = pieces(len);
  const int64_t step = (len + parts - 1) / parts;
  return {split_m, (len + step - 1) / step, step};
}

ffi::Error Sgemm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                 ffi::ResultBuffer<ffi::F32> out, bool trans_a, bool trans_b, int64_t min_part_flops) {
  if (g_sgemm == nullptr) return ffi::Error::Internal("nnbase_sgemm: no BLAS is loaded");
  auto da = a.dimensions(), db = b.dimensions(), dc = out->dimensions();
  const size_t rank = dc.size();
  if (rank < 3 || da.size() != rank || db.size() != rank)
    return ffi::Error::InvalidArgument("nnbase_sgemm: operands must have one rank >= 3");
  const int64_t m = dc[rank - 2], n = dc[rank - 1];
  const int64_t k = trans_a ? da[rank - 2] : da[rank - 1];
  if ((trans_a ? da[rank - 1] : da[rank - 2]) != m || (trans_b ? db[rank - 1] : db[rank - 2]) != k ||
      (trans_b ? db[rank - 2] : db[rank - 1]) != n)
    return ffi::Error::InvalidArgument("nnbase_sgemm: operand shapes do not match");
  if (std::max({m, n, k, da[rank - 1], db[rank - 1]}) > INT_MAX)
    return ffi::Error::InvalidArgument("nnbase_sgemm: a dimension exceeds the BLAS's int");
  // Offsets of each product's operands, leading axes row-major, size-1 axes broadcast.
  int64_t batch = 1;
  for (size_t d = 0; d + 2 < rank; ++d) {
    if ((da[d] != dc[d] && da[d] != 1) || (db[d] != dc[d] && db[d] != 1))
      return ffi::Error::InvalidArgument("nnbase_sgemm: batch axes do not match");
    batch *= dc[d];
  }
  std::vector<int64_t> offset_a(batch), offset_b(batch);
  {
    int64_t step_a = da[rank - 2] * da[rank - 1], step_b = db[rank - 2] * db[rank - 1];
    std::vector<int64_t> index(rank, 0);
    for (int64_t i = 0; i < batch; ++i) {
      int64_t oa = 0, ob = 0, sa = step_a, sb = step_b;
      for (size_t d = rank - 2; d-- > 0;) {
        if (da[d] != 1) oa += index[d] * sa;
        if (db[d] != 1) ob += index[d] * sb;
        sa *= da[d];
        sb *= db[d];
      }
      offset_a[i] = oa;
      offset_b[i] = ob;
      for (size_t d = rank - 2; d-- > 0;) {  // next index, last axis fastest
        if (++index[d] < dc[d]) break;
        index[d] = 0;
      }
    }
  }
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
  w.lda = da[rank - 1];
  w.ldb = db[rank - 1];
  w.ldc = n;
  w.stride_c = m * n;
  w.offset_a = std::move(offset_a);
  w.offset_b = std::move(offset_b);
  w.trans_a = trans_a;
  w.trans_b = trans_b;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const Plan plan = MakePlan(m, n, k, trans_a, trans_b, batch, threads, min_part_flops);
  w.split_m = plan.split_m;
  w.pieces = plan.pieces;
  w.step = plan.step;
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

// MakePlan for tests: writes split_m (0/1), pieces and step.
extern "C" void nnbase_blas_plan(int64_t m, int64_t n, int64_t k, int trans_a, int trans_b,
                                 int64_t batch, int64_t threads, int64_t min_part_flops,
                                 int64_t* out) {
  const Plan p = MakePlan(m, n, k, trans_a != 0, trans_b != 0, batch, threads, min_part_flops);
  out[0] = p.split_m;
  out[1] = p.pieces;
  out[2] = p.step;
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
