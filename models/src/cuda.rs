//! The CUDA device, opened in two deliberate steps so that a confined worker can sit between
//! them: [`load_libraries`] opens every shared library CUDA work will need (the driver's
//! `libcuda`, cuBLAS, cuBLASLt, cuRAND, and the driver's PTX compiler) while the filesystem is
//! still open, and starts no thread; [`open_device`] initialises the driver (its threads, its
//! device nodes) and returns the device with what it reports about itself.
//!
//! The libraries are loaded, not linked (see `scripts/build-cuda.sh`): a CUDA build starts on a
//! host without the NVIDIA driver, computes on the CPU there, and answers `--device cuda` with
//! [`CudaError::NoDriver`] instead of a loader error before `main`. Without the `cuda` feature
//! every function returns [`CudaError::NotBuilt`].

/// Why the CUDA device cannot be used. Never a reason to compute on the CPU instead: the caller
/// asked for the GPU and gets this error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CudaError {
    #[error("this build has no CUDA support (build one with scripts/build-cuda.sh)")]
    NotBuilt,
    #[error("no NVIDIA driver on this host: libcuda.so.1 cannot be loaded (install the driver, or use --device cpu)")]
    NoDriver,
    #[error("the CUDA library {0} cannot be loaded: put the CUDA 13 libraries on the loader's path (LD_LIBRARY_PATH; see README, CUDA)")]
    MissingLibrary(&'static str),
    #[error("cannot use CUDA device {ordinal}: {reason}")]
    Init { ordinal: usize, reason: String },
    #[error("the device failed its self-test: {0}")]
    SelfTest(String),
    #[error("the model needs about {} MiB of device memory (weights {} MiB at {held}, KV cache {} MiB for {sequences} full-length sequence(s) and the copy one of them makes as it grows, rotary tables {} MiB, activations {} MiB), more than cuda:{ordinal} has free ({} MiB of {} MiB): use a smaller model or precision, serve a shorter context or fewer sequences at once (max_sequences)", needed.total() >> 20, needed.weights >> 20, needed.kv_cache >> 20, needed.rotary >> 20, needed.activations >> 20, free >> 20, total >> 20)]
    DeviceMemory {
        ordinal: usize,
        needed: crate::budget::MemoryEstimate,
        /// How the weights are held on the device (`bf16`, `q8_0`, ...).
        held: String,
        /// Sequences whose KV caches `needed` counts.
        sequences: usize,
        free: u64,
        total: u64,
    },
}

/// What a CUDA device reports about itself once initialised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// Compute capability, (major, minor).
    pub capability: (i32, i32),
    /// Device memory free now and in all, bytes.
    pub free_bytes: u64,
    pub total_bytes: u64,
}

/// Libraries the driver itself opens lazily (the PTX JIT compiler, on the first kernel load).
/// Opened here too, if present, so that the driver finds them already loaded once the worker's
/// filesystem is closed; a driver without them fails its own way, later, with its own error.
#[cfg(feature = "cuda")]
const DRIVER_HELPERS: &[&str] = &["libnvidia-ptxjitcompiler.so.1"];

/// Whether a CUDA library can be loaded (cudarc's `is_culib_present`).
#[cfg(feature = "cuda")]
type Probe = unsafe fn() -> bool;

/// Opens every CUDA library this process will use, and returns their names. Starts no thread
/// and initialises nothing: call it before confinement, then [`open_device`] after.
#[cfg(feature = "cuda")]
pub fn load_libraries() -> Result<Vec<&'static str>, CudaError> {
    use candle_core::cuda_backend::cudarc;
    // SAFETY: cudarc's loaders dlopen the named CUDA libraries and keep them for the process's
    // life (a `OnceLock`); `is_culib_present` only probes the names. Loading runs the
    // libraries' initialisers, which start no thread (CUDA starts its threads in `cuInit`).
    unsafe {
        if !cudarc::driver::sys::is_culib_present() {
            return Err(CudaError::NoDriver);
        }
        cudarc::driver::sys::culib();
        let libraries: [(&'static str, Probe); 3] = [
            ("libcublas.so.13", cudarc::cublas::sys::is_culib_present),
            ("libcublasLt.so.13", cudarc::cublaslt::sys::is_culib_present),
            ("libcurand.so.10", cudarc::curand::sys::is_culib_present),
        ];
        let mut loaded = vec!["libcuda.so.1"];
        for (name, present) in libraries {
            if !present() {
                return Err(CudaError::MissingLibrary(name));
            }
            loaded.push(name);
        }
        // Present, so these do not panic.
        cudarc::cublas::sys::culib();
        cudarc::cublaslt::sys::culib();
        cudarc::curand::sys::culib();
        for name in DRIVER_HELPERS {
            if let Ok(lib) = libloading::os::unix::Library::open(
                Some(*name),
                libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL,
            ) {
                // Kept loaded for the process's life: the driver dlopens it by this name.
                std::mem::forget(lib);
                loaded.push(name);
            }
        }
        Ok(loaded)
    }
}

#[cfg(not(feature = "cuda"))]
pub fn load_libraries() -> Result<Vec<&'static str>, CudaError> {
    Err(CudaError::NotBuilt)
}

/// Initialises CUDA device `ordinal` (the driver starts its threads here) and reads what it
/// reports. [`load_libraries`] must have succeeded first.
#[cfg(feature = "cuda")]
pub fn open_device(ordinal: usize) -> Result<(candle_core::Device, DeviceInfo), CudaError> {
    let init = |reason: String| CudaError::Init { ordinal, reason };
    let device = candle_core::Device::new_cuda(ordinal).map_err(|e| init(e.to_string()))?;
    let candle_core::Device::Cuda(cuda) = &device else {
        return Err(init("candle returned a non-CUDA device".into()));
    };
    let stream = cuda.cuda_stream();
    let context = stream.context();
    let (free, total) = context.mem_get_info().map_err(|e| init(e.to_string()))?;
    let info = DeviceInfo {
        ordinal,
        name: context.name().map_err(|e| init(e.to_string()))?,
        capability: context
            .compute_capability()
            .map_err(|e| init(e.to_string()))?,
        free_bytes: free as u64,
        total_bytes: total as u64,
    };
    Ok((device, info))
}

#[cfg(not(feature = "cuda"))]
pub fn open_device(_ordinal: usize) -> Result<(candle_core::Device, DeviceInfo), CudaError> {
    Err(CudaError::NotBuilt)
}

/// Computes on `device` as a model would (a 16-bit matrix product through the BLAS, a compiled
/// element-wise kernel, copies both ways) and checks the answers: a device that initialises but
/// cannot compute under the worker's confinement fails here, with the driver's reason.
pub fn self_test(device: &candle_core::Device) -> Result<(), CudaError> {
    use candle_core::{DType, Tensor};
    let failed = |e: candle_core::Error| CudaError::SelfTest(e.to_string());
    let ones = Tensor::ones((64, 64), DType::BF16, device).map_err(failed)?;
    let product: Vec<f32> = ones
        .matmul(&ones)
        .and_then(|p| p.to_dtype(DType::F32))
        .and_then(|p| p.flatten_all())
        .and_then(|p| p.to_vec1())
        .map_err(failed)?;
    let host = Tensor::new(&[0f32, 1.0, -1.0], &candle_core::Device::Cpu).map_err(failed)?;
    let exp: Vec<f32> = host
        .to_device(device)
        .and_then(|t| t.exp())
        .and_then(|t| t.to_vec1())
        .map_err(failed)?;
    let expected = [1.0, std::f32::consts::E, 1.0 / std::f32::consts::E];
    if product.len() != 64 * 64 || product.iter().any(|&x| x != 64.0) {
        return Err(CudaError::SelfTest(
            "a matrix product came back wrong".into(),
        ));
    }
    if exp.iter().zip(expected).any(|(a, b)| (a - b).abs() > 1e-5) {
        return Err(CudaError::SelfTest(
            "an element-wise kernel came back wrong".into(),
        ));
    }
    Ok(())
}

/// How many sequences (each with a full-length KV cache, plus room for the copy a growing cache
/// makes) the device holds beside the model:
/// `wanted`, or with `by_memory` as many of them as fit (one at least). `one` is the estimate
/// for a single sequence (from [`crate::budget::estimate_on_device`] or its quantized form,
/// weights `held` so). Refuses when even the required count does not fit the free memory.
pub fn sequences_that_fit(
    one: &crate::budget::MemoryEstimate,
    held: &str,
    info: &DeviceInfo,
    wanted: usize,
    by_memory: bool,
) -> Result<usize, CudaError> {
    // A cache grows by copying into a larger one: one sequence at a time holds both.
    let with = |n: usize| crate::budget::MemoryEstimate {
        kv_cache: one.kv_cache.saturating_mul(n as u64 + 1),
        ..*one
    };
    let mut n = wanted.max(1);
    if by_memory {
        while n > 1 && with(n).total() > info.free_bytes {
            n -= 1;
        }
    }
    let needed = with(n);
    if needed.total() <= info.free_bytes {
        return Ok(n);
    }
    Err(CudaError::DeviceMemory {
        ordinal: info.ordinal,
        needed,
        held: held.to_string(),
        sequences: n,
        free: info.free_bytes,
        total: info.total_bytes,
    })
}

/// Whether this build has CUDA support at all.
pub const fn built() -> bool {
    cfg!(feature = "cuda")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_cpu_build_says_so_and_opens_nothing() {
        assert_eq!(load_libraries(), Err(CudaError::NotBuilt));
        assert_eq!(open_device(0).err(), Some(CudaError::NotBuilt));
        assert!(!built());
    }

    #[test]
    fn the_self_test_passes_on_a_device_that_computes() {
        self_test(&candle_core::Device::Cpu).unwrap();
    }

    #[test]
    fn sequences_are_lowered_to_what_the_device_holds_only_when_allowed() {
        let one = crate::budget::MemoryEstimate {
            weights: 1000,
            rotary: 10,
            kv_cache: 100,
            activations: 90,
        };
        let info = |free| DeviceInfo {
            ordinal: 0,
            name: "test".into(),
            capability: (9, 0),
            free_bytes: free,
            total_bytes: 4000,
        };
        // 1300 for the model with one cache and room to grow it, 100 per further sequence.
        assert_eq!(
            sequences_that_fit(&one, "bf16", &info(1500), 8, true),
            Ok(3)
        );
        assert_eq!(
            sequences_that_fit(&one, "bf16", &info(5000), 8, true),
            Ok(8)
        );
        assert_eq!(
            sequences_that_fit(&one, "bf16", &info(1300), 1, false),
            Ok(1)
        );
        // Required: all or nothing, and the refusal says how many were counted.
        match sequences_that_fit(&one, "bf16", &info(1500), 8, false) {
            Err(CudaError::DeviceMemory {
                sequences, needed, ..
            }) => assert_eq!((sequences, needed.kv_cache), (8, 900)),
            other => panic!("{other:?}"),
        }
        // Not even one.
        let refused = sequences_that_fit(&one, "bf16", &info(1299), 4, true).unwrap_err();
        assert!(
            refused.to_string().contains("1 full-length sequence"),
            "{refused}"
        );
    }

    #[test]
    fn errors_name_the_remedy() {
        assert!(CudaError::NoDriver.to_string().contains("--device cpu"));
        assert!(CudaError::MissingLibrary("libcublas.so.13")
            .to_string()
            .contains("LD_LIBRARY_PATH"));
    }
}
