// Explicit instantiations of every torch-free CUDA template for float, half and bfloat16: compiled by
// the CMake OBJECT target fastlm_cuda_kernels (sm_80 / sm_90, -Xptxas -v) and linked into the CUDA
// build of fastlm._C. Each header lists its own instantiations (FASTLM_<HEADER>_INSTANTIATE): a kernel
// added to a header needs no change here.
#include "fastlm/activations.cuh"
#include "fastlm/norm.cuh"
#include "fastlm/qkv_rope.cuh"

namespace fastlm {
namespace cuda {

#define FASTLM_INSTANTIATE(T) \
  FASTLM_NORM_INSTANTIATE(T) FASTLM_QKV_ROPE_INSTANTIATE(T) FASTLM_ACTIVATIONS_INSTANTIATE(T)

FASTLM_INSTANTIATE(float)
FASTLM_INSTANTIATE(__half)
FASTLM_INSTANTIATE(__nv_bfloat16)
FASTLM_NORM_INSTANTIATE_FP32_WEIGHT(__half)
FASTLM_NORM_INSTANTIATE_FP32_WEIGHT(__nv_bfloat16)

#undef FASTLM_INSTANTIATE

}  // namespace cuda
}  // namespace fastlm
