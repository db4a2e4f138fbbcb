// The gumbel operator library: every schema is defined here, once (csrc/gol_schemas.h). Devices
// only add TORCH_LIBRARY_IMPL blocks (csrc/cpu, csrc/cuda); fake kernels and autograd are
// registered from Python (gumbel_kernels/_ops.py).
#include <torch/library.h>

#include "gol_schemas.h"

TORCH_LIBRARY(gumbel, m) { gk::define_gol_schemas(m); }
