// Launcher interface of the kd_loss CUDA kernels (plain C++ + CUDA runtime; no torch headers).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kd_loss/kd_loss.h"

namespace raydistill {
namespace kd {

struct KDLaunchArgs {
  const void* student;          // (rows, V) rows at student_row_stride elements, unit stride in V
  const void* teacher;          // (rows, V) full teacher, or (rows, k) top-k teacher logits (contiguous)
  const int64_t* labels;        // (rows,) or nullptr
  const int64_t* topk_indices;  // (rows, k) contiguous, or nullptr for the full-teacher op
  void* loss;                   // (rows,) float (double when the inputs are float64)
  void* grad;                   // (rows, V) contiguous, student dtype, or nullptr (no gradient)
  int64_t rows, V, k;
  int64_t student_row_stride, teacher_row_stride;
  int student_dtype, teacher_dtype;  // IODType; float64 only as (kF64, kF64)
  bool student_aligned, teacher_aligned, grad_aligned;  // row starts 16-byte aligned: vector loads/stores
  const float* scale;  // device scalar multiplying every row loss and gradient (e.g. 1 / valid rows), or null
  // (rows,) log of the teacher's mass outside its top-k entries (float; double for float64 inputs), or null.
  // Top-k only; the generic kernel handles it (the cluster kernel declines), with a bitmap of the row's k
  // entries in dynamic shared memory (V / 8 bytes per row).
  const void* tail;
  KDParams p;
};

// Enqueues the fused forward (loss rows + optional gradient) on `stream`; returns the launch status.
// Uses the one-pass cluster kernel (kd_loss_cuda_cluster.cu) where it applies, the generic one otherwise.
cudaError_t kd_loss_cuda_launch(const KDLaunchArgs& args, cudaStream_t stream);

// The one-pass thread-block-cluster kernel (sm_90+). cudaErrorNotSupported (nothing enqueued) when the
// call is outside what it handles; the caller then runs the generic kernel.
cudaError_t kd_loss_cuda_launch_cluster(const KDLaunchArgs& args, cudaStream_t stream);

}  // namespace kd
}  // namespace raydistill
