// Schemas of the fused distillation losses (SPEC section 4). Each returns (loss, grad): grad is the
// gradient of loss with respect to the first (student) input, computed in the same pass when
// compute_grad is true (else an empty tensor); the Python autograd only rescales it.
//
//   pair_kd_loss(logits [B, K], labels int64 [B], partner int64 [B] (an involution), ...):
//     ce_weight * mean_{valid i} CE(z_i, y_i)
//       + kd_weight * T^2 * mean_{pairs} KL(sg(softmax(z_t / T)) || softmax(z_s / T))
//     teacher t of a pair = the member with the higher log_softmax(z)[y] (ties and NaN: the lower
//     index); rows with an ignored label are not read (gradient exactly 0), masked terms are
//     selected out, never multiplied by 0;
//     symmetric: both directions, each with weight 1/2. Empty means (no valid row, no pair) are 0.
//   kd_loss(student [B, K], teacher [B, K], ...): rows_i = KL(softmax(t_i / T) || softmax(s_i / T));
//     loss = loss_scale * sum_i rows_i (or loss_scale * rows when per_row), grad = grad_scale * (q - p).
//   feature_alignment_loss(student[], target[], channels_last[], kind, scales[], per_layer, ...):
//     loss_l = scales[l] * sum of the per-element (kind 0 mse, 1 l1, 2 smooth_l1) or per-position
//     (kind 3: 1 - cosine similarity along dim 1) losses; returns sum_l loss_l (or [L] when
//     per_layer) and the gradient of every layer in one flat buffer, layer after layer, each in its
//     student's memory order (contiguous, or channels-last when channels_last[l]).
//   scale_grad(grad, scale, ends): the backward of the three: grad * scale (scale cast to grad's
//     dtype, as torch's multiply), with scale a scalar (0-d), one value per row of a 2-D grad (ends
//     empty), or one value per segment [ends[l-1], ends[l]) of a flat grad. A new tensor.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastsd_C, m) {
  m.def(
      "pair_kd_loss(Tensor logits, Tensor labels, Tensor partner, float temperature, float kd_weight, "
      "float ce_weight, bool symmetric, int ignore_index, bool compute_grad) -> (Tensor, Tensor)");
  m.def(
      "kd_loss(Tensor student, Tensor teacher, float temperature, float loss_scale, float grad_scale, "
      "bool per_row, bool compute_grad) -> (Tensor, Tensor)");
  m.def(
      "feature_alignment_loss(Tensor[] student, Tensor[] target, bool[] channels_last, int kind, "
      "float[] scales, bool per_layer, bool compute_grad) -> (Tensor, Tensor)");
  m.def("scale_grad(Tensor grad, Tensor scale, int[] ends) -> Tensor");
}
