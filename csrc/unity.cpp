// csrc's small sources, compiled as one translation unit (setup.py: a source that another one
// #includes is compiled through it, not on its own). Each of them alone spent 13-22 s of the
// compiler's time in torch's headers for a few dozen lines of its own: 115 s of the extension's
// 228 s of compile time here (2 cores: about 1 minute of `make test`), where together they take
// about as long as the largest one. Kernels (csrc/cpu/{losses,mix,patch_swap}.cpp) stay units of
// their own: their code, not the headers, is their compile time, and ninja runs them side by side.
//
// fastsd.cpp first: it sets Py_LIMITED_API before Python.h is included.
#include "fastsd.cpp"

#include "losses.cpp"
#include "mix.cpp"
#include "patch_swap.cpp"

#include "cpu/alloc.cpp"
#include "cpu/capability.cpp"
#include "cpu/scale_grad.cpp"
