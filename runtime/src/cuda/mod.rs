//! The CUDA executor: the same API shape as [`crate::cpu::CpuExecutor`] (`new(graph,
//! weights)`, `run(&feeds)` → outputs as [`HostTensor`]s), running every node on the GPU.
//!
//! * Kernels come from `kiln-codegen` (one CUDA C kernel per node kind and dtype, compiled
//!   by NVRTC for the device's architecture, cached on disk); matmul goes through cuBLAS
//!   (f32, and f16/bf16 with f32 accumulation, strided-batched, transposes as operand ops).
//! * Weights and constants are uploaded once, at construction. Each run uploads the
//!   feeds, allocates intermediates (stream-ordered), frees each after its last use and
//!   copies the outputs back. A reshape shares its operand's buffer.
//! * CUDA is loaded at run time (`cudarc` with dynamic loading): the build needs no CUDA,
//!   and [`CudaExecutor::available`] says whether a GPU and the libraries are usable.
//!
//! Storage dtypes: f32, f16, bf16, i64, i32, i8, u8, bool (fp8 and int4 are not handled
//! yet); floats compute in f32 inside kernels.

pub mod bandwidth;
mod blas;
mod engine;
mod executor;

pub use engine::{
    attention_early_off_by_env, attention_fused_off_by_env, epilogue_gemv_off_by_env, horizontal_off_by_env,
    matvec_fused_gemv, scaled_gemv_off_by_env, stream_gemv_off_by_env, CudaEngine, EngineOptions, MemoryReport,
    PREFILL_ROWS,
};
pub use executor::{allow_dynamic_smem, CudaExecutor, CudaOptions};
pub use kiln_codegen::CompileStats;

use crate::error::RuntimeError;
use cudarc::driver::{sys, CudaContext};
use kiln_ops::{DType, HostData, HostTensor};
use std::fmt;

/// The GPU an executor runs on.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// (major, minor), e.g. (9, 0) on Hopper.
    pub compute_capability: (i32, i32),
    pub total_memory: usize,
    pub multiprocessors: i32,
    /// As `cuDriverGetVersion` reports it (13000 = CUDA 13.0).
    pub driver_version: i32,
    pub nvrtc_version: (i32, i32),
}

impl fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "GPU {} {} (sm_{}{}, {} SMs, {:.1} GiB), driver CUDA {}.{}, NVRTC {}.{}",
            self.ordinal,
            self.name,
            self.compute_capability.0,
            self.compute_capability.1,
            self.multiprocessors,
            self.total_memory as f64 / (1u64 << 30) as f64,
            self.driver_version / 1000,
            self.driver_version % 1000 / 10,
            self.nvrtc_version.0,
            self.nvrtc_version.1
        )
    }
}

/// Errors of the CUDA executor.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// The same weight, feed and graph errors as the CPU executor.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("CUDA is not usable: {0}")]
    Unavailable(String),
    /// A node the GPU backend cannot run yet (a dtype or size it does not handle).
    #[error("node %{node} ({op}{}): {reason}", if .scope.is_empty() { String::new() } else { format!(" in `{}`", .scope) })]
    Unsupported { node: usize, op: String, scope: String, reason: String },
    #[error(transparent)]
    Compile(#[from] kiln_codegen::CompileError),
    /// A CUDA driver or cuBLAS call failed.
    #[error("CUDA: {0}")]
    Driver(String),
}

impl From<CudaError> for RuntimeError {
    fn from(e: CudaError) -> RuntimeError {
        match e {
            CudaError::Runtime(r) => r,
            other => RuntimeError::Backend { backend: "cuda", msg: other.to_string() },
        }
    }
}

pub(crate) fn driver_err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> CudaError + '_ {
    move |e| CudaError::Driver(format!("{what}: {e:?}"))
}

/// Whether `libcuda`, `libnvrtc` and `libcublas` load and a device is present; the
/// first device's description, or why not.
pub fn available() -> Result<DeviceInfo, String> {
    device_info(0)
}

/// [`available`] for device `ordinal`.
pub fn device_info(ordinal: usize) -> Result<DeviceInfo, String> {
    match std::panic::catch_unwind(|| probe(ordinal)) {
        Ok(r) => r,
        Err(_) => Err("probing CUDA panicked (a library without an expected symbol?)".into()),
    }
}

fn probe(ordinal: usize) -> Result<DeviceInfo, String> {
    // SAFETY: these only try to dlopen the libraries by their candidate names.
    if !unsafe { sys::is_culib_present() } {
        return Err("the NVIDIA driver library (libcuda.so) could not be loaded: no driver installed".into());
    }
    if !kiln_codegen::nvrtc::nvrtc_present() {
        return Err(
            "libnvrtc could not be loaded (install the CUDA toolkit, or add its lib dir to LD_LIBRARY_PATH)".into()
        );
    }
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(
            "libcublas could not be loaded (install the CUDA toolkit, or add its lib dir to LD_LIBRARY_PATH)".into()
        );
    }
    cudarc::driver::result::init().map_err(|e| format!("cuInit failed: {e:?}"))?;
    let count = CudaContext::device_count().map_err(|e| format!("cuDeviceGetCount failed: {e:?}"))?;
    if count <= ordinal as i32 {
        return Err(format!("no CUDA device {ordinal} ({count} found)"));
    }
    let ctx = CudaContext::new(ordinal).map_err(|e| format!("cannot create a context on device {ordinal}: {e:?}"))?;
    let mut driver_version = 0;
    // SAFETY: plain out-parameter.
    unsafe { sys::cuDriverGetVersion(&mut driver_version) }
        .result()
        .map_err(|e| format!("cuDriverGetVersion: {e:?}"))?;
    let nvrtc_version = kiln_codegen::nvrtc::nvrtc_version().map_err(|e| e.to_string())?;
    Ok(DeviceInfo {
        ordinal,
        name: ctx.name().map_err(|e| format!("{e:?}"))?,
        compute_capability: ctx.compute_capability().map_err(|e| format!("{e:?}"))?,
        total_memory: ctx.total_mem().map_err(|e| format!("{e:?}"))?,
        multiprocessors: ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| format!("{e:?}"))?,
        driver_version,
        nvrtc_version,
    })
}

/// A tensor's storage as little-endian bytes (bool as 0/1 bytes).
pub(crate) fn host_bytes(t: &HostTensor) -> Vec<u8> {
    fn le<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
        v.iter().flat_map(|&x| f(x)).collect()
    }
    match t.data() {
        HostData::F32(v) => le(v, f32::to_le_bytes),
        HostData::F16(v) => le(v, |x| x.to_bits().to_le_bytes()),
        HostData::BF16(v) => le(v, |x| x.to_bits().to_le_bytes()),
        HostData::I64(v) => le(v, i64::to_le_bytes),
        HostData::I32(v) => le(v, i32::to_le_bytes),
        HostData::I8(v) => le(v, i8::to_le_bytes),
        HostData::Bool(v) => v.iter().map(|&b| b as u8).collect(),
        HostData::U8(v) | HostData::F8E4M3(v) | HostData::I4(v) => v.clone(),
    }
}

/// A tensor of `dtype` and `shape` from little-endian storage bytes.
pub(crate) fn tensor_from_bytes(dtype: DType, shape: &[usize], b: &[u8]) -> Result<HostTensor, CudaError> {
    fn conv<const N: usize, T>(b: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
        b.chunks_exact(N).map(|c| f(c.try_into().expect("chunks_exact"))).collect()
    }
    let data = match dtype {
        DType::F32 => HostData::F32(conv(b, f32::from_le_bytes)),
        DType::F16 => HostData::F16(conv(b, |c| half::f16::from_bits(u16::from_le_bytes(c)))),
        DType::BF16 => HostData::BF16(conv(b, |c| half::bf16::from_bits(u16::from_le_bytes(c)))),
        DType::I64 => HostData::I64(conv(b, i64::from_le_bytes)),
        DType::I32 => HostData::I32(conv(b, i32::from_le_bytes)),
        DType::I8 => HostData::I8(conv(b, i8::from_le_bytes)),
        DType::U8 => HostData::U8(b.to_vec()),
        DType::Bool => HostData::Bool(b.iter().map(|&x| x != 0).collect()),
        DType::F8E4M3 => HostData::F8E4M3(b.to_vec()),
        DType::I4 => HostData::I4(b.to_vec()),
    };
    HostTensor::new(shape.to_vec(), data).map_err(|e| CudaError::Driver(format!("downloaded tensor: {e}")))
}
