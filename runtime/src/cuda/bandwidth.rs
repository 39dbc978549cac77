//! Device memory bandwidth, measured: the ceiling a memory-bound decode step can reach.

use super::{driver_err, CudaError};
use cudarc::driver::{sys, CudaContext};

/// Bytes of the host pattern that seeds the source buffer.
const PATTERN: usize = 16 << 20;

/// Device-to-device copy bandwidth of device `device`, in bytes per second counting the
/// bytes read and the bytes written (`2 · bytes / t`), the median over `iters` timed
/// copies of a `bytes` buffer after one warm-up copy. Each copy is timed with CUDA events.
///
/// Use a buffer far larger than the L2 cache (≥ 1 GiB) to measure DRAM/HBM.
pub fn copy_bandwidth(device: usize, bytes: usize, iters: usize) -> Result<f64, CudaError> {
    if bytes == 0 || iters == 0 {
        return Err(CudaError::Driver(format!("copy_bandwidth: bytes ({bytes}) and iters ({iters}) must be positive")));
    }
    super::device_info(device).map_err(CudaError::Unavailable)?;
    let ctx = CudaContext::new(device).map_err(driver_err("context"))?;
    let stream = ctx.new_stream().map_err(driver_err("stream"))?;

    // Non-zero source data: a host pattern uploaded once, then replicated on the device.
    let pattern: Vec<u8> = (0..PATTERN.min(bytes)).map(|i| (i.wrapping_mul(131) % 251 + 1) as u8).collect();
    let mut seed = stream.alloc_zeros::<u8>(pattern.len()).map_err(driver_err("alloc pattern"))?;
    stream.memcpy_htod(&pattern, &mut seed).map_err(driver_err("upload pattern"))?;
    let mut src = stream.alloc_zeros::<u8>(bytes).map_err(driver_err("alloc source"))?;
    let mut dst = stream.alloc_zeros::<u8>(bytes).map_err(driver_err("alloc destination"))?;
    let mut at = 0;
    while at < bytes {
        let n = pattern.len().min(bytes - at);
        stream.memcpy_dtod(&seed.slice(..n), &mut src.slice_mut(at..at + n)).map_err(driver_err("fill source"))?;
        at += n;
    }

    let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
    let mut times = Vec::with_capacity(iters);
    stream.memcpy_dtod(&src, &mut dst).map_err(driver_err("warm-up copy"))?;
    for _ in 0..iters {
        let start = stream.record_event(timing).map_err(driver_err("event"))?;
        stream.memcpy_dtod(&src, &mut dst).map_err(driver_err("copy"))?;
        let end = stream.record_event(timing).map_err(driver_err("event"))?;
        let ms = start.elapsed_ms(&end).map_err(driver_err("event elapsed"))?;
        times.push(ms as f64 / 1e3);
    }
    stream.synchronize().map_err(driver_err("synchronize"))?;
    let t = median(&mut times);
    if t <= 0.0 {
        return Err(CudaError::Driver(format!("copy_bandwidth: a copy of {bytes} bytes timed at {t} s")));
    }
    Ok(2.0 * bytes as f64 / t)
}

/// `(free, total)` bytes of device `device`'s memory, as `cuMemGetInfo` reports them.
pub fn memory_info(device: usize) -> Result<(usize, usize), CudaError> {
    super::device_info(device).map_err(CudaError::Unavailable)?;
    let ctx = CudaContext::new(device).map_err(driver_err("context"))?;
    ctx.mem_get_info().map_err(driver_err("cuMemGetInfo"))
}

/// The median of `v` (the mean of the middle two for an even count); NaN when empty.
pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&mut []).is_nan());
    }

    #[test]
    fn bandwidth_without_a_gpu_is_an_error() {
        match super::super::available() {
            Ok(_) => {
                let bw = copy_bandwidth(0, 64 << 20, 3).unwrap();
                assert!(bw > 1e9, "{bw} B/s");
            }
            Err(_) => {
                let e = copy_bandwidth(0, 1 << 20, 1).unwrap_err();
                assert!(matches!(e, CudaError::Unavailable(_)), "{e}");
            }
        }
        assert!(copy_bandwidth(0, 0, 1).is_err());
    }
}
