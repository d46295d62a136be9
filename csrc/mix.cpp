// Schema of the mix kernel (SPEC section 6).
//
//   mix(x, partner, boxes, lam, use_box), per row i with p = partner[i], (y0, y1, x0, x1) = boxes[i]:
//     use_box[i]: out[i, :, h, w] = x[p, :, h, w] if y0 <= h < y1 and x0 <= w < x1 else x[i, :, h, w]
//     else:       out[i] = x[i] * lam[i] + x[p] * (1 - lam[i])
//                 (1 - lam in lam's dtype; both weights in the compute type, float64 for float64 x
//                 and float32 otherwise; products and sum rounded to x's dtype as PyTorch's eager
//                 ops round them; uint8: the float32 value rounded half to even)
//
//   mix_(x, ...): the same, in place, for an involution partner (partner[partner[i]] == i): only the
//     mixed pixels are read and written.
//
//   mix_backward(grad, partner, boxes, lam, use_box), q the inverse permutation of partner (CUDA only;
//     on the CPU fastsd runs the reference's gather):
//     grad_x[j] = kept(grad)[j] + sent(grad)[q[j]]: a CutMix row keeps grad outside its box and sends
//     it inside; a MixUp row keeps grad * lam and sends grad * (1 - lam) (weights cast to grad's dtype)
//
//   mix_check(partner, sorted, boxes, lam, H, W, involution) (CUDA only): device-side asserts of the
//     public functions' values: partner a permutation (sorted == range(B)) or, with involution, an
//     involution; 0 <= y0 <= y1 <= H and 0 <= x0 <= x1 <= W; 0 <= lam <= 1
//
// x is contiguous NCHW or channels_last (the output has the same layout); partner int64 [B];
// boxes int64 [B, 4]; lam float32/float64 [B]; use_box bool [B].
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastsd_C, m) {
  m.def("mix(Tensor x, Tensor partner, Tensor boxes, Tensor lam, Tensor use_box) -> Tensor");
  m.def("mix_(Tensor(a!) x, Tensor partner, Tensor boxes, Tensor lam, Tensor use_box) -> ()");
  m.def("mix_backward(Tensor grad, Tensor partner, Tensor boxes, Tensor lam, Tensor use_box) -> Tensor");
  m.def("mix_check(Tensor partner, Tensor sorted, Tensor boxes, Tensor lam, int H, int W, bool involution) -> ()");
}
