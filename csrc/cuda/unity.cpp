// The torch-facing launchers, compiled as one translation unit (see csrc/unity.cpp): each spent
// about 23 s of the host compiler's time in torch's headers, together about as long as one.
#include "mix_ops.cpp"
#include "patch_swap_ops.cpp"
