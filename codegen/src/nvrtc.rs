//! NVRTC compilation with a disk cache.
//!
//! Every kernel is compiled for the device's own architecture (`--gpu-architecture=sm_XY`,
//! e.g. `sm_90` on Hopper) to a CUBIN, so loading it needs no driver JIT. Results are
//! cached on disk under [`default_cache_dir`], keyed by a hash of (source, architecture,
//! options, NVRTC version): a warm start compiles nothing. Misses compile in parallel.
//!
//! The kernels include no CUDA headers (`kiln.cuh` defines the 16-bit float storage
//! types itself), so no include path is needed; [`probe_builtin_headers`] reports whether
//! this NVRTC also resolves `<cuda_bf16.h>` / `<cuda_fp16.h>` on its own.

use crate::kernels::Kernel;
use cudarc::nvrtc::{result, sys};
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Options every kernel is compiled with (besides the architecture). `--fmad=false`: no
/// contraction of `a*b + c` into one FMA, so generated elementwise code rounds exactly as
/// the CPU reference does (fused RoPE is bit-identical); dot products that want FMAs
/// write `fmaf` explicitly.
pub const OPTIONS: &[&str] = &["--std=c++17", "--fmad=false", "--prec-div=true", "--prec-sqrt=true"];

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("NVRTC is not available: {0}")]
    Unavailable(String),
    #[error("NVRTC failed to compile `{kernel}` ({status}):\n{log}")]
    Compile { kernel: String, status: String, log: String },
    #[error("NVRTC: {0}")]
    Nvrtc(String),
}

/// What a batch of compilations did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CompileStats {
    /// Kernels compiled by NVRTC.
    pub compiled: usize,
    /// Kernels read from the disk cache.
    pub cached: usize,
    /// Kernels taken from binaries given by the caller (an executable plan).
    pub prebuilt: usize,
    /// Wall time of the whole batch, cache reads included.
    pub seconds: f64,
}

/// `$KILN_CACHE/kernels`, else `$XDG_CACHE_HOME/kiln/kernels`, else
/// `~/.cache/kiln/kernels`, else a folder under the system temp dir.
pub fn default_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KILN_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("kernels");
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("kiln").join("kernels");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(h).join(".cache").join("kiln").join("kernels");
    }
    std::env::temp_dir().join("kiln").join("kernels")
}

/// Whether the NVRTC library can be loaded.
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library by its candidate names.
    unsafe { sys::is_culib_present() }
}

/// NVRTC's (major, minor) version.
pub fn nvrtc_version() -> Result<(i32, i32), CompileError> {
    if !nvrtc_present() {
        return Err(CompileError::Unavailable("libnvrtc could not be loaded".into()));
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: plain out-parameters.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| CompileError::Nvrtc(format!("nvrtcVersion: {e:?}")))?;
    Ok((major, minor))
}

/// A stable 128-bit FNV-1a hash (two 64-bit lanes with different offsets), as hex.
pub fn stable_hash(parts: &[&[u8]]) -> String {
    let mut h = [0xcbf29ce484222325u64, 0x84222325cbf29ce4u64];
    for p in parts {
        for (lane, x) in h.iter_mut().enumerate() {
            for &b in p.iter().chain(&[0xffu8, lane as u8]) {
                *x ^= b as u64;
                *x = x.wrapping_mul(0x100000001b3);
            }
        }
    }
    format!("{:016x}{:016x}", h[0], h[1])
}

/// Compiles kernels for one architecture, with a disk cache.
#[derive(Clone, Debug)]
pub struct Compiler {
    /// `sm_90` etc.
    pub arch: String,
    pub cache_dir: Option<PathBuf>,
    version: (i32, i32),
}

impl Compiler {
    /// For compute capability `major.minor`; `cache_dir: None` disables the cache.
    pub fn new(cc: (i32, i32), cache_dir: Option<PathBuf>) -> Result<Compiler, CompileError> {
        let version = nvrtc_version()?;
        Ok(Compiler { arch: format!("sm_{}{}", cc.0, cc.1), cache_dir, version })
    }

    pub fn version(&self) -> (i32, i32) {
        self.version
    }

    fn options(&self) -> Vec<String> {
        let mut o = vec![format!("--gpu-architecture={}", self.arch)];
        o.extend(OPTIONS.iter().map(|s| s.to_string()));
        o
    }

    /// The cache key of a kernel source under this compiler.
    pub fn key(&self, source: &str) -> String {
        let opts = self.options().join(" ");
        let ver = format!("nvrtc {}.{}", self.version.0, self.version.1);
        stable_hash(&[source.as_bytes(), self.arch.as_bytes(), opts.as_bytes(), ver.as_bytes()])
    }

    fn cache_path(&self, key: &str) -> Option<PathBuf> {
        self.cache_dir.as_ref().map(|d| d.join(format!("{key}.cubin")))
    }

    /// CUBINs for `kernels`, in order: from the cache where present, else compiled (in
    /// parallel) and stored. Logs how many were compiled and cached and the time.
    pub fn compile_all(&self, kernels: &[&Kernel]) -> Result<(Vec<Vec<u8>>, CompileStats), CompileError> {
        self.compile_all_with(kernels, None)
    }

    /// As [`Compiler::compile_all`], but a kernel whose cache key ([`Compiler::key`]) is
    /// in `prebuilt` takes that binary (neither the disk cache nor NVRTC is asked).
    pub fn compile_all_with(
        &self,
        kernels: &[&Kernel],
        prebuilt: Option<&std::collections::HashMap<String, Vec<u8>>>,
    ) -> Result<(Vec<Vec<u8>>, CompileStats), CompileError> {
        let t0 = Instant::now();
        let keys: Vec<String> = kernels.iter().map(|k| self.key(&k.source)).collect();
        let mut out: Vec<Option<Vec<u8>>> = keys.iter().map(|k| prebuilt.and_then(|p| p.get(k)).cloned()).collect();
        let given = out.iter().filter(|o| o.is_some()).count();
        for (o, k) in out.iter_mut().zip(&keys) {
            if o.is_none() {
                *o = self.cache_path(k).and_then(|p| std::fs::read(p).ok());
            }
        }
        let cached = out.iter().filter(|o| o.is_some()).count() - given;
        let misses: Vec<usize> = (0..kernels.len()).filter(|&i| out[i].is_none()).collect();
        let threads = std::thread::available_parallelism().map_or(4, |n| n.get()).clamp(1, 16);
        let results: Vec<(usize, Result<Vec<u8>, CompileError>)> = std::thread::scope(|s| {
            let chunks: Vec<Vec<usize>> = (0..threads)
                .map(|t| misses.iter().copied().skip(t).step_by(threads).collect())
                .filter(|c: &Vec<usize>| !c.is_empty())
                .collect();
            let handles: Vec<_> = chunks
                .into_iter()
                .map(|chunk| {
                    s.spawn(move || chunk.into_iter().map(|i| (i, self.compile_one(kernels[i]))).collect::<Vec<_>>())
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().expect("compile thread panicked")).collect()
        });
        for (i, r) in results {
            let cubin = r?;
            if let Some(p) = self.cache_path(&keys[i]) {
                store(&p, &cubin);
            }
            out[i] = Some(cubin);
        }
        let stats =
            CompileStats { compiled: misses.len(), cached, prebuilt: given, seconds: t0.elapsed().as_secs_f64() };
        tracing::info!(
            compiled = stats.compiled,
            cached = stats.cached,
            prebuilt = stats.prebuilt,
            seconds = stats.seconds,
            arch = %self.arch,
            "CUDA kernels: {} compiled, {} from cache, {} prebuilt in {:.3} s",
            stats.compiled,
            stats.cached,
            stats.prebuilt,
            stats.seconds
        );
        Ok((out.into_iter().map(|o| o.expect("every kernel compiled or cached")).collect(), stats))
    }

    /// Compiles one kernel to a CUBIN.
    pub fn compile_one(&self, k: &Kernel) -> Result<Vec<u8>, CompileError> {
        compile_source(&k.source, &k.sig.name, &self.options())
    }
}

/// Writes through a temp file and a rename, so readers never see half a file.
fn store(path: &Path, bytes: &[u8]) {
    let Some(dir) = path.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() {
        tracing::warn!("kernel cache: cannot create {}", dir.display());
        return;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    if std::fs::write(&tmp, bytes).and_then(|_| std::fs::rename(&tmp, path)).is_err() {
        tracing::warn!("kernel cache: cannot write {}", path.display());
        let _ = std::fs::remove_file(&tmp);
    }
}

fn c_string_lossy(v: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = v.iter().map(|&c| c as u8).take_while(|&b| b != 0).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Compiles `source` with `options` and returns the CUBIN (a real `sm_` architecture
/// must be among the options).
pub fn compile_source(source: &str, name: &str, options: &[String]) -> Result<Vec<u8>, CompileError> {
    if !nvrtc_present() {
        return Err(CompileError::Unavailable("libnvrtc could not be loaded".into()));
    }
    let src = CString::new(source).map_err(|_| CompileError::Nvrtc("source contains a NUL byte".into()))?;
    let cname = CString::new(format!("{name}.cu")).expect("kernel names have no NUL");
    let prog = result::create_program(&src, Some(&cname)).map_err(|e| CompileError::Nvrtc(format!("{e:?}")))?;
    // SAFETY: `prog` was just created and is destroyed exactly once below; `src` and
    // `cname` outlive it.
    let r = unsafe {
        let compiled = result::compile_program(prog, options);
        let r = match compiled {
            Err(e) => {
                let log = result::get_program_log(prog).map(|l| c_string_lossy(&l)).unwrap_or_default();
                Err(CompileError::Compile { kernel: name.to_string(), status: format!("{e:?}"), log })
            }
            Ok(()) => {
                let mut size = 0usize;
                match sys::nvrtcGetCUBINSize(prog, &mut size).result() {
                    Err(e) => Err(CompileError::Nvrtc(format!("nvrtcGetCUBINSize: {e:?}"))),
                    Ok(()) => {
                        let mut buf = vec![0u8; size];
                        sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut std::ffi::c_char)
                            .result()
                            .map(|_| buf)
                            .map_err(|e| CompileError::Nvrtc(format!("nvrtcGetCUBIN: {e:?}")))
                    }
                }
            }
        };
        let _ = result::destroy_program(prog);
        r
    };
    r
}

/// Whether NVRTC resolves `<cuda_fp16.h>` and `<cuda_bf16.h>` without an include path
/// (information only: kiln's kernels do not need them). `Ok(())` or the compile log.
pub fn probe_builtin_headers(arch: &str) -> Result<(), String> {
    let src = "#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n\
               extern \"C\" __global__ void probe(__nv_bfloat16* a, __half* b) { a[0] = __float2bfloat16(1.0f); b[0] = __float2half(1.0f); }\n";
    compile_source(src, "probe_headers", &[format!("--gpu-architecture={arch}")]).map(|_| ()).map_err(|e| e.to_string())
}
