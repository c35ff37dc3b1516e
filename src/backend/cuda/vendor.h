#pragma once
// The header shim: the CUDA backend's sources speak CUDA; chips with a CUDA dialect compile the
// same kernels through this header (HIP for AMD: hipcc defines __HIP_PLATFORM_AMD__). Only the
// runtime names the backend uses are mapped. The GEMM library (cuBLASLt / hipBLASLt) differs in
// a few names too; that mapping belongs here when the HIP build is added.
#if defined(__HIP_PLATFORM_AMD__)
#include <hip/hip_runtime.h>
#define cudaError_t hipError_t
#define cudaSuccess hipSuccess
#define cudaGetErrorString hipGetErrorString
#define cudaGetDeviceCount hipGetDeviceCount
#define cudaGetDeviceProperties hipGetDeviceProperties
#define cudaDeviceProp hipDeviceProp_t
#define cudaSetDevice hipSetDevice
#define cudaMalloc hipMalloc
#define cudaFree hipFree
#define cudaMemGetInfo hipMemGetInfo
#define cudaMemcpyAsync hipMemcpyAsync
#define cudaMemcpyHostToDevice hipMemcpyHostToDevice
#define cudaMemcpyDeviceToHost hipMemcpyDeviceToHost
#define cudaStream_t hipStream_t
#define cudaStreamCreate hipStreamCreate
#define cudaStreamDestroy hipStreamDestroy
#define cudaStreamSynchronize hipStreamSynchronize
#define cudaGetLastError hipGetLastError
#else
#include <cuda_runtime.h>
#endif
