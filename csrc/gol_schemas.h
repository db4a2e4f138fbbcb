// The schemas of the gumbel operators, written once. csrc/gol_loss.cpp defines them in the
// `gumbel` library; the CUDA emulator (csrc/cuda_emulation) defines the same schemas in its
// own `gumbel_emulated` library, so that its ops take exactly the arguments of the real ones.
#pragma once

#include <torch/library.h>

namespace gk {

inline void define_gol_schemas(torch::Library& m) {
  // Fused GOL loss forward: returns (loss, grad) where grad = d loss / d logits for a unit
  // upstream gradient (empty when need_grad is false). See gumbel_kernels/INTERFACES.md.
  // `seed` is a one-element integer tensor on the CPU or on the logits' device (read there).
  m.def(
      "gol_loss(Tensor logits, Tensor labels, Tensor? drop_classes, Tensor? class_weight, "
      "Tensor? row_weight, Tensor seed, int offset=0, str mode=\"droploss\", "
      "str activation=\"gumbel\", str reduction=\"mean\", float? clamp_min=-4.0, "
      "float? clamp_max=10.0, str grad_mode=\"reference\", int ignore_index=-100, "
      "bool need_grad=True) -> (Tensor, Tensor)");
  // gol_loss with EQLv2's needs (see gumbel_kernels/INTERFACES.md): the positive
  // element of a row with label j weighted by pos_weight[j] (default: class_weight[j]), and,
  // from the same pass, per-class sums over the positive resp. negative elements of
  // |d loss_sum / d q_ij| (the gradient of the "sum"-reduced loss), as float64 (C,) tensors.
  // reduction is "mean" or "sum"; the gradient is always returned.
  m.def(
      "gol_loss_class_stats(Tensor logits, Tensor labels, Tensor? drop_classes, "
      "Tensor? class_weight, Tensor? pos_weight, Tensor? row_weight, Tensor seed, int offset=0, "
      "str mode=\"droploss\", str activation=\"gumbel\", str reduction=\"mean\", "
      "float? clamp_min=-4.0, float? clamp_max=10.0, str grad_mode=\"reference\", "
      "int ignore_index=-100) -> (Tensor, Tensor, Tensor, Tensor)");
  // exp(-exp(-q)) on the raw logits.
  m.def("gumbel_activation(Tensor logits) -> Tensor");
  // grad *= grad_output in place, skipped (on the device, no host sync) when grad_output is a
  // scalar equal to 1. The backward of the fused loss: it only scales the saved gradient.
  m.def("scale_grad_(Tensor(a!) grad, Tensor grad_output) -> ()");
}

}  // namespace gk
