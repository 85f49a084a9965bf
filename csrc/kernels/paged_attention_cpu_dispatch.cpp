// Picks the CPU attention variant for this machine. AVX2+FMA is about 1.3-1.4x
// faster than the baseline x86-64 build; FMA rounds differently, so results are
// bit-stable per machine type, not across machine types.
// KEVLARFLOW_CPU_ISA=generic forces the portable variant (tests cover both).
#include <cstdlib>
#include <cstring>

#include "paged_attention.h"

namespace kevlarflow {

void paged_attention_cpu_generic(const PagedAttentionArgs&, const ParallelFor&);
#ifdef KEVLARFLOW_HAVE_AVX2
void paged_attention_cpu_avx2(const PagedAttentionArgs&, const ParallelFor&);
#endif

const char* paged_attention_cpu_isa() {
  const char* forced = std::getenv("KEVLARFLOW_CPU_ISA");
  if (forced && std::strcmp(forced, "generic") == 0) return "generic";
#ifdef KEVLARFLOW_HAVE_AVX2
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2) return "avx2";
#endif
  return "generic";
}

void paged_attention_cpu(const PagedAttentionArgs& args, const ParallelFor& parallel_for) {
#ifdef KEVLARFLOW_HAVE_AVX2
  if (std::strcmp(paged_attention_cpu_isa(), "avx2") == 0)
    return paged_attention_cpu_avx2(args, parallel_for);
#endif
  paged_attention_cpu_generic(args, parallel_for);
}

}  // namespace kevlarflow
