// peftfx's native CPU decoder: NF4/FP4 (+ double quant) and int8 formats -> fp32/bf16/fp16, and the
// decode-shaped matmul y[M, N] = x[M, K] @ deq(W).T (M <= 16) that streams the packed weight once:
// for NF4/FP4 with M <= 8 and K % 128 == 0 (fused_matmul in decode_simd.inc) the codes are decoded in
// registers and never stored; otherwise each group of rows is decoded into an L1 tile first.
//
// Built just in time by peftfx/kernels/cpu_native.py (torch.utils.cpp_extension.load, one translation
// unit, which is why this file holds the formats, checks, dispatch and ops together at ~400 lines; the
// per-ISA kernels are in decode_simd.inc). Only light torch headers are included (Tensor, Parallel, library): <torch/extension.h> costs
// ~30 s of compile time on one core against ~4 s for these.
//
// The SIMD kernels live in decode_simd.inc, included twice below: once compiled for AVX-512
// (16-lane vpermps lookups from a register) and once for AVX2 (two 8-lane vpermps + blend); the
// ISA is picked at run time with __builtin_cpu_supports, with the scalar code here as the fallback.
//
// Exactness contract (peftfx.kernels.reference.dequantize is the oracle): every value is one fp32
// product code * scale (int8-zeropoint: (q - zero) * scale), rounded once to the output dtype with
// round-to-nearest-even. Double-quant scales are dyn[q] * scales2 then + offset, two fp32 roundings:
// the build passes -ffp-contract=off so the compiler never fuses them into one FMA.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>
#ifdef __linux__
#include <sys/mman.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

namespace peftfx_native {

enum Format : int64_t { NF4 = 0, FP4 = 1, INT8 = 2, INT8_ZP = 3, LLM_INT8 = 4 };
enum Isa : int64_t { SCALAR = 0, AVX2 = 1, AVX512 = 2 };
// x rows up to which the 4-bit matmul decodes in registers (fused_matmul); beyond, decoding a tile
// once into L1 and reusing it for every x row (decode_matmul) is cheaper than decoding once per 4 rows.
constexpr int64_t FUSED_MAX_ROWS = 8;

// Raw views of one QuantizedWeight's storage (checked by check_storage before any read).
struct Storage {
  int64_t fmt;
  const uint8_t* packed;     // nf4/fp4: ceil(numel/2) bytes; int8 formats: numel bytes
  const float* scales;       // fp32 per block (nullptr with double quant)
  const uint8_t* scales_q;   // double quant: uint8 codes of absmax - offset
  const float* scales2;      // double quant: fp32 [ceil(n_blocks / bs2)]
  const float* offset;       // double quant: fp32 scalar; int8-zeropoint: fp32 zero point per block
  const float* code;         // 16-entry codebook (4-bit formats)
  const float* dyn;          // 256-entry dynamic map (double quant)
  int64_t bs, bs2, rows, cols;
  int bs_shift, bs2_shift;   // log2 of the block sizes when they are powers of two, else -1
  bool four_bit() const { return fmt == NF4 || fmt == FP4; }
  // block of flat element e (a shift, not a 64-bit division: this runs once per block)
  int64_t block_of(int64_t e) const { return bs_shift >= 0 ? e >> bs_shift : e / bs; }
};

inline int log2_exact(int64_t v) {
  return v > 0 && (v & (v - 1)) == 0 ? __builtin_ctzll(static_cast<unsigned long long>(v)) : -1;
}

// Scale of block b (llm-int8: row b). Written as separate statements so each op rounds once.
inline float block_scale(const Storage& s, int64_t b) {
  if (s.scales_q != nullptr) {
    float t = s.dyn[s.scales_q[b]] * s.scales2[s.bs2_shift >= 0 ? b >> s.bs2_shift : b / s.bs2];
    return t + s.offset[0];
  }
  if (s.fmt == LLM_INT8) return s.scales[b] / 127.0f;
  return s.scales[b];
}

inline float zero_point(const Storage& s, int64_t b) { return s.fmt == INT8_ZP ? s.offset[b] : 0.0f; }

// Element e of deq(W) (flat row-major index) in fp32, given its block's scale and zero point.
inline float decode_one(const Storage& s, int64_t e, float scale, float zero) {
  switch (s.fmt) {
    case NF4:
    case FP4: {
      uint8_t byte = s.packed[e >> 1];
      return s.code[(e & 1) ? (byte & 15) : (byte >> 4)] * scale;
    }
    case INT8_ZP:
      return (static_cast<float>(s.packed[e]) - zero) * scale;
    default:  // int8, llm-int8
      return static_cast<float>(static_cast<int8_t>(s.packed[e])) * scale;
  }
}

template <class Out> inline Out to_out(float v) { return static_cast<Out>(v); }  // c10 casts round to nearest even

namespace scalar {
template <class Out>
void decode_range(const Storage& s, int64_t e0, int64_t e1, Out* out) {
  int64_t e = e0;
  while (e < e1) {
    int64_t b = s.block_of(e), end = std::min(e1, (b + 1) * s.bs);
    float sc = block_scale(s, b), z = zero_point(s, b);
    for (; e < end; ++e) *out++ = to_out<Out>(decode_one(s, e, sc, z));
  }
}
}  // namespace scalar

}  // namespace peftfx_native

// ------------------------------------------------------------------------------- AVX-512 kernels
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2")
namespace peftfx_native { namespace avx512 {
constexpr int W = 16;       // fp32 lanes
constexpr int MB_MAX = 4;   // x rows per micro-kernel pass: 4 x 4 accumulators + 4 weights + 1 x = 21 zmm
using VF = __m512;
using VIraw = __m512i;
struct Lut { __m512 t; };
inline Lut make_lut(const float* code) { return {_mm512_loadu_ps(code)}; }
inline VF fmadd(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }
inline float hsum(VF v) { return _mm512_reduce_add_ps(v); }
// 16 codes from 8 packed bytes (even element in the high nibble) -> 16 codebook values.
// 16-entry lookup: lane j gets lut[i_j & 15] (vpermps reads index bits 3:0 only).
inline VF lookup(__m512i i, const Lut& lut) { return _mm512_permutexvar_ps(i, lut.t); }
inline VF decode4(const uint8_t* p, const Lut& lut) {
  __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  __m512i i = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(b, b));         // each byte twice
  return lookup(_mm512_srlv_epi32(i, _mm512_set_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4)), lut);
}
// fused GEMV vocabulary: W packed dwords, a lane shift, a lane permutation of floats
// fused passes: up to FUSED_MB x rows at once, against fused_rows(mb) weight rows:
// 2 x mb x rows accumulators + rows codes + mb x + table + weight <= 27 zmm
constexpr int FUSED_MB = 8;
constexpr int fused_rows(int mb) { return mb == 1 ? 8 : mb == 2 ? 4 : mb <= 4 ? 2 : 1; }
// from SCALED_MIN_MB x rows on, fused_pass_scaled: mb x scaled_rows(mb) accumulators + rows codes, scales
// and weights + x + table <= 26 zmm
constexpr int SCALED_MIN_MB = 5;
constexpr int scaled_rows(int mb) { return 2; }
inline VF gather(const float* base, VIraw i) { return _mm512_i32gather_ps(i, base, 4); }
inline VIraw load_u8_dwords(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline VIraw load_dwords(const uint8_t* p) { return _mm512_loadu_si512(p); }
inline VIraw srli(VIraw v, int s) { return _mm512_srli_epi32(v, s); }
inline VF permute_lanes(VF v, VIraw i) { return _mm512_permutexvar_ps(i, v); }
// 16 rounded bf16 bit patterns (in 32-bit lanes) -> 16 uint16 in memory
inline void store_low_halves(void* p, __m512i r) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}
inline void store(c10::Half* p, VF v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#include "decode_simd.inc"
}}  // namespace peftfx_native::avx512
#pragma GCC pop_options

// ---------------------------------------------------------------------------------- AVX2 kernels
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2")
namespace peftfx_native { namespace avx2 {
constexpr int W = 8;
constexpr int MB_MAX = 2;   // 2 x 4 accumulators + 4 weights + 1 x = 13 of 16 ymm
using VF = __m256;
using VIraw = __m256i;
struct Lut { __m256 lo, hi; };
inline Lut make_lut(const float* code) { return {_mm256_loadu_ps(code), _mm256_loadu_ps(code + 8)}; }
inline VF fmadd(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
inline float hsum(VF v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
// 8 codes from 4 packed bytes: two 8-entry vpermps halves, blended on index bit 3.
// 16-entry lookup on index bits 3:0 (bits above are ignored): two 8-entry vpermps, blended on bit 3.
inline VF lookup(__m256i i, const Lut& lut) {
  VF lo = _mm256_permutevar8x32_ps(lut.lo, i), hi = _mm256_permutevar8x32_ps(lut.hi, i);
  return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(i, 28)));
}
inline VF decode4(const uint8_t* p, const Lut& lut) {
  int32_t raw;
  std::memcpy(&raw, p, 4);
  __m128i b = _mm_cvtsi32_si128(raw);
  __m256i i = _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(b, b));
  return lookup(_mm256_srlv_epi32(i, _mm256_set_epi32(0, 4, 0, 4, 0, 4, 0, 4)), lut);
}
// weight rows per fused pass: 2 x mb x rows accumulators + codes + x + 2 table halves + lookup temps <= 16 ymm
constexpr int FUSED_MB = 2;
constexpr int fused_rows(int mb) { return mb == 1 ? 2 : 1; }
constexpr int SCALED_MIN_MB = FUSED_MB + 1;  // never: 16 ymm hold no MB x 2 accumulators beside the lookup's
constexpr int scaled_rows(int mb) { return 1; }
inline VF gather(const float* base, VIraw i) { return _mm256_i32gather_ps(base, i, 4); }
inline VIraw load_u8_dwords(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
inline VIraw load_dwords(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline VIraw srli(VIraw v, int s) { return _mm256_srli_epi32(v, s); }
inline VF permute_lanes(VF v, VIraw i) { return _mm256_permutevar8x32_ps(v, i); }
inline void store_low_halves(void* p, __m256i r) {
  __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);  // lanes 0 and 2
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
inline void store(c10::Half* p, VF v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#include "decode_simd.inc"
}}  // namespace peftfx_native::avx2
#pragma GCC pop_options

namespace peftfx_native {

// ---------------------------------------------------------------------------------- ISA dispatch
static Isa detect_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return AVX2;
  return SCALAR;
}

static const Isa kDetected = detect_isa();
static std::atomic<int64_t> g_isa{kDetected};

// Cap the ISA (tests run every path on one machine); returns the ISA now in use (wanted < 0: no change).
int64_t set_isa(int64_t wanted) {
  if (wanted >= 0) g_isa = std::min<int64_t>(wanted, kDetected);
  return g_isa;
}
int64_t detected_isa() { return kDetected; }

template <class Out>
void decode_range_dispatch(const Storage& s, int64_t e0, int64_t e1, Out* out) {
  switch (g_isa.load(std::memory_order_relaxed)) {
    case AVX512: return avx512::decode_range(s, e0, e1, out);
    case AVX2: return avx2::decode_range(s, e0, e1, out);
    default: return scalar::decode_range(s, e0, e1, out);
  }
}

// --------------------------------------------------------------------------------- input checks
// The Python side raises a KernelError naming the layer before it calls in here; these checks are
// the second line of defence: nothing below reads outside the tensors checked here.
static Storage check_storage(const at::Tensor& packed, const at::Tensor& scales, const std::optional<at::Tensor>& scales2,
                             const std::optional<at::Tensor>& offset, const at::Tensor& code, const at::Tensor& dyn,
                             int64_t fmt, int64_t bs, int64_t bs2, int64_t rows, int64_t cols) {
  TORCH_CHECK(fmt >= NF4 && fmt <= LLM_INT8, "peftfx_native: unknown format id ", fmt);
  TORCH_CHECK(rows > 0 && cols > 0, "peftfx_native: bad weight shape [", rows, ", ", cols, "]");
  const bool four = fmt == NF4 || fmt == FP4;
  if (fmt == LLM_INT8) bs = cols;  // one scale per row
  TORCH_CHECK(bs >= 1 && (fmt == LLM_INT8 || (bs >= 16 && (bs & (bs - 1)) == 0)),
              "peftfx_native: block size ", bs, " must be a power of two >= 16");
  const int64_t numel = rows * cols, n_blocks = (numel + bs - 1) / bs;
  auto cpu_contig = [](const at::Tensor& t, const char* what) {
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "peftfx_native: ", what, " must be a contiguous CPU tensor");
  };
  cpu_contig(packed, "packed");
  cpu_contig(scales, "scales");
  TORCH_CHECK(packed.scalar_type() == (fmt == INT8 || fmt == LLM_INT8 ? at::kChar : at::kByte),
              "peftfx_native: packed has the wrong dtype ", packed.scalar_type());
  TORCH_CHECK(packed.numel() == (four ? (numel + 1) / 2 : numel), "peftfx_native: packed has ", packed.numel(),
              " elements, shape [", rows, ", ", cols, "] needs ", four ? (numel + 1) / 2 : numel);
  TORCH_CHECK(scales.numel() == n_blocks, "peftfx_native: scales has ", scales.numel(), " elements, expected ", n_blocks);
  Storage s{fmt, static_cast<const uint8_t*>(packed.data_ptr()), nullptr, nullptr, nullptr, nullptr,
            nullptr, nullptr, bs, bs2, rows, cols, log2_exact(bs), log2_exact(bs2)};
  const bool dq = four && scales2.has_value();
  if (dq) {
    TORCH_CHECK(scales.scalar_type() == at::kByte, "peftfx_native: double-quant scales must be uint8");
    TORCH_CHECK(bs2 >= 1, "peftfx_native: block_size2 must be positive");
    cpu_contig(*scales2, "scales2");
    TORCH_CHECK(scales2->scalar_type() == at::kFloat && scales2->numel() == (n_blocks + bs2 - 1) / bs2,
                "peftfx_native: scales2 must be float32 [", (n_blocks + bs2 - 1) / bs2, "]");
    TORCH_CHECK(offset.has_value(), "peftfx_native: double quantization needs an offset");
    cpu_contig(*offset, "offset");
    TORCH_CHECK(offset->scalar_type() == at::kFloat && offset->numel() == 1, "peftfx_native: offset must be one float32");
    cpu_contig(dyn, "dynamic map");
    TORCH_CHECK(dyn.scalar_type() == at::kFloat && dyn.numel() == 256, "peftfx_native: dynamic map must be float32 [256]");
    s.scales_q = static_cast<const uint8_t*>(scales.data_ptr());
    s.scales2 = scales2->data_ptr<float>();
    s.offset = offset->data_ptr<float>();
    s.dyn = dyn.data_ptr<float>();
  } else {
    TORCH_CHECK(scales.scalar_type() == at::kFloat, "peftfx_native: scales must be float32");
    s.scales = scales.data_ptr<float>();
  }
  if (fmt == INT8_ZP) {
    TORCH_CHECK(offset.has_value(), "peftfx_native: int8-zeropoint needs zero points");
    cpu_contig(*offset, "zero points");
    TORCH_CHECK(offset->scalar_type() == at::kFloat && offset->numel() == n_blocks,
                "peftfx_native: zero points must be float32 [", n_blocks, "]");
    s.offset = offset->data_ptr<float>();
  }
  if (four) {
    cpu_contig(code, "codebook");
    TORCH_CHECK(code.scalar_type() == at::kFloat && code.numel() == 16, "peftfx_native: codebook must be float32 [16]");
    s.code = code.data_ptr<float>();
  }
  return s;
}

// ------------------------------------------------------------------------------------------- ops
// A freshly allocated output of many MB costs more in 4 KB page faults than in decoding (measured:
// 64 MB fp32 = 16 ms of decode and ~65 ms of first-touch faults in this VM). Asking for transparent
// huge pages before the first write turns 16384 faults into 32; pages already touched are unaffected.
// Only for a whole dequantized weight the caller keeps (advise_huge, from cpu_native.dequantize), never in
// decode_window: the advice sticks to the address range, and cpu_gemm's short-lived tiles live in malloc's
// reused heap, where every later fault in an advised range may stall in direct compaction (THP
// defrag=madvise). Advising the tiles cost the fp32 training step 100-150 ms of kernel time a step
// (bench/RESULTS.md, cpu_train).
static void advise_huge_pages(void* p, int64_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = 2u << 20;
  if (nbytes < static_cast<int64_t>(2 * kHuge)) return;
  uintptr_t a = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  uintptr_t b = (reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(nbytes)) & ~(kHuge - 1);
  if (b > a) madvise(reinterpret_cast<void*>(a), b - a, MADV_HUGEPAGE);  // advice only: errors are harmless
#else
  (void)p, (void)nbytes;
#endif
}

// deq(W)[r0:r1, c0:c1] into out (2-D, unit column stride, any row stride; fp32, bf16 or fp16).
void decode_window(const at::Tensor& packed, const at::Tensor& scales, const std::optional<at::Tensor>& scales2,
                   const std::optional<at::Tensor>& offset, const at::Tensor& code, const at::Tensor& dyn, int64_t fmt,
                   int64_t bs, int64_t bs2, int64_t rows, int64_t cols, int64_t r0, int64_t r1, int64_t c0, int64_t c1,
                   at::Tensor& out) {
  const Storage s = check_storage(packed, scales, scales2, offset, code, dyn, fmt, bs, bs2, rows, cols);
  TORCH_CHECK(0 <= r0 && r0 < r1 && r1 <= rows && 0 <= c0 && c0 < c1 && c1 <= cols,
              "peftfx_native: window [", r0, ":", r1, ", ", c0, ":", c1, "] outside [", rows, ", ", cols, "]");
  TORCH_CHECK(out.device().is_cpu() && out.dim() == 2 && out.size(0) == r1 - r0 && out.size(1) == c1 - c0 &&
                  out.stride(1) == 1 && out.stride(0) >= c1 - c0,
              "peftfx_native: out must be a CPU [", r1 - r0, ", ", c1 - c0, "] tensor with unit column stride");
  const int64_t ld = out.stride(0), width = c1 - c0;
  auto run = [&](auto* base) {
    using Out = std::remove_pointer_t<decltype(base)>;
    if (c0 == 0 && c1 == cols && ld == cols) {  // one flat range: split it evenly, whatever the shape
      const int64_t e_begin = r0 * cols, n = (r1 - r0) * cols;
      at::parallel_for(0, n, 1 << 16, [&](int64_t a, int64_t b) { decode_range_dispatch<Out>(s, e_begin + a, e_begin + b, base + a); });
      return;
    }
    at::parallel_for(r0, r1, std::max<int64_t>(1, (1 << 16) / width), [&](int64_t a, int64_t b) {
      for (int64_t r = a; r < b; ++r) decode_range_dispatch<Out>(s, r * cols + c0, r * cols + c1, base + (r - r0) * ld);
    });
  };
  switch (out.scalar_type()) {
    case at::kFloat: return run(out.data_ptr<float>());
    case at::kBFloat16: return run(out.data_ptr<c10::BFloat16>());
    case at::kHalf: return run(out.data_ptr<c10::Half>());
    default: TORCH_CHECK(false, "peftfx_native: output dtype must be float32, bfloat16 or float16, got ", out.scalar_type());
  }
}

// Transparent-huge-page advice for a fresh contiguous CPU tensor, before its first write (see above).
void advise_huge(const at::Tensor& out) {
  TORCH_CHECK(out.device().is_cpu() && out.is_contiguous(), "peftfx_native: advise_huge takes a contiguous CPU tensor");
  advise_huge_pages(out.data_ptr(), out.numel() * out.element_size());
}

namespace scalar {
// Reference-speed matmul for CPUs without AVX2: decode a row chunk, dot it with every x row.
void decode_matmul(const Storage& s, const float* x, int64_t m, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  constexpr int64_t KC = 512;
  float buf[KC];
  for (int64_t n = n0; n < n1; ++n) {
    float acc[16] = {0};
    for (int64_t k0 = 0; k0 < s.cols; k0 += KC) {
      const int64_t kl = std::min(KC, s.cols - k0);
      decode_range<float>(s, n * s.cols + k0, n * s.cols + k0 + kl, buf);
      for (int64_t i = 0; i < m; ++i)
        for (int64_t k = 0; k < kl; ++k) acc[i] += x[i * s.cols + k0 + k] * buf[k];
    }
    for (int64_t i = 0; i < m; ++i) y[i * ldy + n] = acc[i];
  }
}
}  // namespace scalar

// y[M, N] = x[M, K] @ deq(W).T for M <= 16, fp32; y may be a column slice (unit column stride).
void decode_matmul(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                   const std::optional<at::Tensor>& scales2, const std::optional<at::Tensor>& offset,
                   const at::Tensor& code, const at::Tensor& dyn, int64_t fmt, int64_t bs, int64_t bs2, int64_t rows,
                   int64_t cols, at::Tensor& y) {
  const Storage s = check_storage(packed, scales, scales2, offset, code, dyn, fmt, bs, bs2, rows, cols);
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.scalar_type() == at::kFloat && x.dim() == 2 &&
                  x.size(1) == cols && x.size(0) >= 1 && x.size(0) <= 16,
              "peftfx_native: x must be a contiguous float32 [M <= 16, ", cols, "] CPU tensor");
  const int64_t m = x.size(0);
  TORCH_CHECK(y.device().is_cpu() && y.scalar_type() == at::kFloat && y.dim() == 2 && y.size(0) == m &&
                  y.size(1) == rows && y.stride(1) == 1 && y.stride(0) >= rows,
              "peftfx_native: y must be a float32 [", m, ", ", rows, "] CPU tensor with unit column stride");
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t ldy = y.stride(0);
  // grain: enough rows that a task streams ~256 KB of weight
  const int64_t grain = std::max<int64_t>(4, (1 << 19) / cols) / 4 * 4;
  const int64_t isa = g_isa.load(std::memory_order_relaxed);
  if (s.four_bit() && cols % 128 == 0 && m <= FUSED_MAX_ROWS && isa != SCALAR) {  // fused: decode in registers, nothing in memory
    // x in chunk order, 64-byte aligned: every vector load of it then stays inside one cache line (a
    // malloc'd buffer is only 16-byte aligned, and split loads cost the GEMV ~1/4 of its time at M = 8)
    std::vector<float> xp_buf(static_cast<size_t>(m * cols + 16));
    float* xpa = xp_buf.data() + ((64 - reinterpret_cast<uintptr_t>(xp_buf.data()) % 64) % 64) / sizeof(float);
    if (isa == AVX512) avx512::permute_x(x.data_ptr<float>(), m, cols, xpa);
    else avx2::permute_x(x.data_ptr<float>(), m, cols, xpa);
    at::parallel_for(0, rows, grain, [&](int64_t a, int64_t b) {
      if (isa == AVX512) avx512::fused_matmul(s, xpa, m, yp, ldy, a, b);
      else avx2::fused_matmul(s, xpa, m, yp, ldy, a, b);
    });
    return;
  }
  at::parallel_for(0, rows, grain, [&](int64_t a, int64_t b) {
    if (isa == AVX512) avx512::decode_matmul(s, xp, m, yp, ldy, a, b);
    else if (isa == AVX2) avx2::decode_matmul(s, xp, m, yp, ldy, a, b);
    else scalar::decode_matmul(s, xp, m, yp, ldy, a, b);
  });
}

TORCH_LIBRARY(peftfx_native, lib) {
  lib.def("decode_window(Tensor packed, Tensor scales, Tensor? scales2, Tensor? offset, Tensor code, Tensor dyn, "
          "int format, int block_size, int block_size2, int rows, int cols, int r0, int r1, int c0, int c1, "
          "Tensor(a!) out) -> ()");
  lib.def("decode_matmul(Tensor x, Tensor packed, Tensor scales, Tensor? scales2, Tensor? offset, Tensor code, "
          "Tensor dyn, int format, int block_size, int block_size2, int rows, int cols, Tensor(a!) y) -> ()");
  lib.def("set_isa(int wanted) -> int", &set_isa);
  lib.def("detected_isa() -> int", &detected_isa);
  lib.def("advise_huge(Tensor out) -> ()");
}

TORCH_LIBRARY_IMPL(peftfx_native, CPU, lib) {
  lib.impl("decode_window", &decode_window);
  lib.impl("decode_matmul", &decode_matmul);
  lib.impl("advise_huge", &advise_huge);
}

}  // namespace peftfx_native
