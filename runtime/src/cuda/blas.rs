//! Matmul through cuBLAS: row-major `C[m, n] = op(A) · op(B)` per batch, computed as the
//! column-major product `Cᵀ = op(B)ᵀ · op(A)ᵀ` with `cublasGemmStridedBatchedEx`
//! (f32 compute for f32, f16 and bf16 storage; no TF32).

use super::CudaError;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::cublas::{result, CudaBlas};
use kiln_ops::DType;

/// One strided-batched product. `a` holds `[m, k]` (`[k, m]` if `ta`) per batch, `b`
/// holds `[k, n]` (`[n, k]` if `tb`), shared by every batch when `shared_b`.
pub(crate) struct Gemm {
    pub dtype: DType,
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub ta: bool,
    pub tb: bool,
    pub shared_b: bool,
}

fn int(what: &str, v: usize) -> Result<i32, CudaError> {
    i32::try_from(v).map_err(|_| CudaError::Driver(format!("matmul {what} = {v} exceeds cuBLAS's int range")))
}

impl Gemm {
    /// Runs on the handle's stream. Pointers are device addresses of contiguous storage.
    pub fn run(&self, blas: &CudaBlas, a: u64, b: u64, c: u64) -> Result<(), CudaError> {
        let dt = match self.dtype {
            DType::F32 => cudaDataType::CUDA_R_32F,
            DType::F16 => cudaDataType::CUDA_R_16F,
            DType::BF16 => cudaDataType::CUDA_R_16BF,
            d => return Err(CudaError::Driver(format!("matmul on {d} is not supported on the GPU"))),
        };
        let (m, n, k) = (int("m", self.m)?, int("n", self.n)?, int("k", self.k)?);
        let batch = int("batch", self.batch)?;
        // First cuBLAS operand: B. Row-major [k, n] is column-major [n, k] (op N, ld n);
        // row-major [n, k] (tb) is column-major [k, n] (op T, ld k).
        let (op_b, ld_b) =
            if self.tb { (cublasOperation_t::CUBLAS_OP_T, k) } else { (cublasOperation_t::CUBLAS_OP_N, n) };
        let (op_a, ld_a) =
            if self.ta { (cublasOperation_t::CUBLAS_OP_T, m) } else { (cublasOperation_t::CUBLAS_OP_N, k) };
        let stride_b = if self.shared_b { 0 } else { (self.k * self.n) as i64 };
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: the executor allocated a, b and c with exactly these sizes (batch·m·k,
        // k·n or batch·k·n, batch·m·n elements of `dtype`); alpha/beta are host f32s as
        // the default pointer mode and the f32 compute type require.
        unsafe {
            result::gemm_strided_batched_ex(
                *blas.handle(),
                op_b,
                op_a,
                n,
                m,
                k,
                &alpha as *const f32 as *const _,
                b as *const _,
                dt,
                ld_b.max(1),
                stride_b,
                a as *const _,
                dt,
                ld_a.max(1),
                (self.m * self.k) as i64,
                &beta as *const f32 as *const _,
                c as *mut _,
                dt,
                n.max(1),
                (self.m * self.n) as i64,
                batch,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| CudaError::Driver(format!("cublasGemmStridedBatchedEx: {e:?}")))
    }
}
