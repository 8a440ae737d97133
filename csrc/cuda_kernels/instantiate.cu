// Explicit instantiations of every torch-free CUDA template for float, half and bfloat16: compiled by
// the CMake OBJECT target fastlm_cuda_kernels (sm_80 / sm_90, -Xptxas -v) and linked into the CUDA
// build of fastlm._C.
#include "fastlm/activations.cuh"
#include "fastlm/norm.cuh"
#include "fastlm/qkv_rope.cuh"

namespace fastlm {
namespace cuda {

#define FASTLM_INSTANTIATE(T)                                                                                    \
  template cudaError_t add_rms_norm<T, T, T>(const T*, const T*, const T*, T*, T*, NormRows, float, bool,       \
                                             cudaStream_t);                                                     \
  template cudaError_t add_layer_norm<T>(const T*, const T*, const T*, const T*, T*, T*, NormRows, float,       \
                                         cudaStream_t);                                                         \
  template cudaError_t qkv_rope<T>(const QkvParams<T>&, cudaStream_t);                                          \
  template cudaError_t swiglu<T>(const T*, int64_t, T*, int64_t, int64_t, int64_t, cudaStream_t);               \
  template cudaError_t relu2<T>(const T*, int64_t, T*, int64_t, int64_t, int64_t, cudaStream_t);

FASTLM_INSTANTIATE(float)
FASTLM_INSTANTIATE(__half)
FASTLM_INSTANTIATE(__nv_bfloat16)

// fp32 weights with half / bf16 activations: Helium order (output in T) and Arcee order (promoted fp32).
template cudaError_t add_rms_norm<__half, float, __half>(const __half*, const __half*, const float*, __half*,
                                                         __half*, NormRows, float, bool, cudaStream_t);
template cudaError_t add_rms_norm<__half, float, float>(const __half*, const __half*, const float*, float*, __half*,
                                                        NormRows, float, bool, cudaStream_t);
template cudaError_t add_rms_norm<__nv_bfloat16, float, __nv_bfloat16>(const __nv_bfloat16*, const __nv_bfloat16*,
                                                                       const float*, __nv_bfloat16*, __nv_bfloat16*,
                                                                       NormRows, float, bool, cudaStream_t);
template cudaError_t add_rms_norm<__nv_bfloat16, float, float>(const __nv_bfloat16*, const __nv_bfloat16*,
                                                               const float*, float*, __nv_bfloat16*, NormRows, float,
                                                               bool, cudaStream_t);

#undef FASTLM_INSTANTIATE

}  // namespace cuda
}  // namespace fastlm
