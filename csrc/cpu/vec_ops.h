// at::vec::Vectorized<float> plugged into the element math of gol_math.h, so the CPU kernel's
// SIMD body runs exactly the formulas the scalar (and CUDA) instantiations run.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include "../gol_math.h"

namespace gk {
namespace cpu {

struct VecOps {
  using V = at::vec::Vectorized<float>;
  using M = V;  // comparison results are all-ones / all-zeros lanes
  static V splat(float x) { return V(x); }
  static V exp(const V& x) { return x.exp(); }
  static V expm1(const V& x) { return x.expm1(); }
  static V log(const V& x) { return x.log(); }
  static V log1p(const V& x) { return x.log1p(); }
  static V neg(const V& x) { return x.neg(); }
  static V abs(const V& x) { return x.abs(); }
  static M lt(const V& a, const V& b) { return a < b; }
  static M gt(const V& a, const V& b) { return a > b; }
  static M both(const M& a, const M& b) { return a & b; }
  static V select(const M& m, const V& a, const V& b) { return V::blendv(b, a, m); }
};

}  // namespace cpu
}  // namespace gk
