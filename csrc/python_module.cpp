// The Python module stub of gumbel_kernels._C (setup.py builds only): importing it loads the
// operator library, whose static initialisers run the TORCH_LIBRARY registrations.
#include <Python.h>

// `import gumbel_kernels._C` loads this library, which runs the registrations above.
PyMODINIT_FUNC PyInit__C(void) {  // exported despite -fvisibility=hidden
#if defined(GUMBEL_BUILT_WITH_AVX2) && (defined(__GNUC__) || defined(__clang__))
  // setup.py enables AVX2 when the build machine has it; refuse to run elsewhere rather than
  // die on an illegal instruction inside a kernel.
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma") ||
      !__builtin_cpu_supports("f16c")) {
    PyErr_SetString(PyExc_ImportError,
                    "gumbel_kernels._C was built with AVX2/FMA/F16C but this CPU lacks one of them: rebuild "
                    "with GUMBEL_CPU_AVX2=0 (pip install --no-build-isolation -e .)");
    return nullptr;
  }
#endif
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
