// Element types shared by the CPU kernels, without any framework headers.
// bf16 and fp16 are stored as raw 16-bit patterns; conversions are written so
// that the compiler can vectorize them (pure integer/bit operations, no calls).
#pragma once
#include <cstdint>
#include <cstring>

namespace kevlarflow {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

inline int64_t dtype_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

struct bf16 { uint16_t bits; };
struct fp16 { uint16_t bits; };

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float to_float(float x) { return x; }
inline float to_float(bf16 x) { return bits_to_float(uint32_t(x.bits) << 16); }

// IEEE half -> float. Normal numbers are rebiased by shifting the exponent and
// mantissa into place and scaling by 2^-112; subnormals are rebuilt by placing
// the mantissa under a fixed exponent and subtracting that exponent's value.
inline float to_float(fp16 x) {
  const uint32_t w = uint32_t(x.bits) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t twice = w + w;  // drops the sign bit
  const float normal = bits_to_float((twice >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float subnormal = bits_to_float((twice >> 17) | (126u << 23)) - 0.5f;
  const uint32_t mag = twice < (1u << 27) ? float_to_bits(subnormal) : float_to_bits(normal);
  return bits_to_float(sign | mag);
}

template <typename T> T from_float(float f);
template <> inline float from_float<float>(float f) { return f; }

// float -> bf16 with round-to-nearest-even; NaN stays a (quiet) NaN.
template <> inline bf16 from_float<bf16>(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{uint16_t(u >> 16)};
}

// float -> half with round-to-nearest-even, overflow to inf, gradual underflow.
template <> inline fp16 from_float<fp16>(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return fp16{uint16_t(sign | 0x7e00u)};          // NaN
  if (a >= 0x477ff000u) return fp16{uint16_t(sign | 0x7c00u)};         // rounds to inf
  if (a < 0x38800000u) {                                               // subnormal or zero
    // Adding 0.5 aligns the half subnormal mantissa with the float's low bits,
    // and the float adder performs the round-to-nearest-even for us.
    const float shifted = bits_to_float(a) + 0.5f;
    return fp16{uint16_t(sign | uint16_t(float_to_bits(shifted) - float_to_bits(0.5f)))};
  }
  uint32_t r = a + ((15u - 127u) << 23) + 0xfffu + ((a >> 13) & 1u);
  return fp16{uint16_t(sign | uint16_t(r >> 13))};
}

}  // namespace kevlarflow
