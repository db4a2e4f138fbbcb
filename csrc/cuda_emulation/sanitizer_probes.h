// Test-only kernels with deliberate bugs, one per class of bug a sanitizer build of the
// emulator must catch (tests/test_sanitizers.py runs each and fails if the sanitizer is silent).
#pragma once

#include <c10/util/string_view.h>

namespace gk {
namespace cuda {

// bug: "none" (the same kernels, correct), "missing_barrier" (a block reduction without its
// __syncthreads: ThreadSanitizer), "out_of_bounds" (reads one element past a tensor:
// AddressSanitizer), "misaligned_vector_load" (a 16-byte vector load from a 4-byte aligned
// address: UBSan). Returns what the kernels computed.
double sanitizer_probe(c10::string_view bug);

}  // namespace cuda
}  // namespace gk
