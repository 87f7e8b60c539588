//! The one place that chooses a backend: `--backend cpu|wgpu|cuda|tch` and `--device` become a burn
//! `Device`. burn 0.22's tensors carry no backend type, so nothing below the CLI knows or cares
//! which backend runs it.

// Shared with build.rs (which records the version built against). A child module of this
// file, so that tests/backends.rs, which includes this file by path, gets it too.
#[path = "libtorch_version.rs"]
#[cfg_attr(not(feature = "tch"), allow(dead_code))]
mod libtorch_version;

use anyhow::{Result, bail};
use burn::tensor::Device;
use clap::ValueEnum;

/// Compute backends; `wgpu`, `cuda` and `tch` exist in builds with the matching Cargo feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// burn's pure-Rust flex CPU backend (always built).
    Cpu,
    /// wgpu: Vulkan, Metal or DX12 (`cargo build --features wgpu`).
    Wgpu,
    /// NVIDIA GPUs through CubeCL's CUDA runtime (`cargo build --features cuda`; needs the
    /// driver and NVRTC at run time, no CUDA toolkit to build).
    Cuda,
    /// libtorch on CPU or CUDA (`cargo build --features tch`, see scripts/setup-libtorch.sh).
    Tch,
}

impl Backend {
    /// The name `--backend` takes.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Wgpu => "wgpu",
            Backend::Cuda => "cuda",
            Backend::Tch => "tch",
        }
    }
}

/// Parses `INDEX` in `name:INDEX`, defaulting to 0.
#[allow(dead_code)] // Used only by the optional backends.
fn index(spec: &str, name: &str) -> Result<usize> {
    match spec
        .strip_prefix(name)
        .map(|rest| rest.trim_start_matches(':'))
    {
        Some("") => Ok(0),
        Some(i) => i
            .parse()
            .map_err(|_| anyhow::anyhow!("--device {spec}: {i:?} is not a device index")),
        None => bail!("--device {spec}: expected {name} or {name}:INDEX"),
    }
}

/// The device for `backend`, from `--device` (backend-specific; see `--help`), checked to be
/// usable: a GPU backend without its driver or device fails here with a message, not later
/// with a panic deep inside the first tensor operation.
pub fn device(backend: Backend, spec: Option<&str>) -> Result<Device> {
    let device = device_unchecked(backend, spec)?;
    if backend != Backend::Cpu {
        probe(&device, backend, spec)?;
    }
    Ok(device)
}

/// Runs one tiny operation on `device`: wgpu (cubecl) and tch report a missing driver or
/// device by panicking, which becomes advice here.
fn probe(device: &Device, backend: Backend, spec: Option<&str>) -> Result<()> {
    let what = spec.unwrap_or("the default device");
    let result = masklm_train::catch_backend_panic(|| {
        burn::tensor::Tensor::<1>::ones([2], device)
            .sum()
            .into_scalar::<f32>()
    });
    match result {
        Ok(2.0) => Ok(()),
        Ok(sum) => bail!(
            "--backend {} ({what}): a test sum gave {sum}, not 2",
            backend.name()
        ),
        Err(detail) => {
            let advice = match backend {
                Backend::Wgpu => {
                    "wgpu needs a Vulkan, Metal or DX12 driver: on Linux the Vulkan loader \
                     (libvulkan1) and a driver (the GPU vendor's, or mesa-vulkan-drivers for \
                     the CPU-only lavapipe); `vulkaninfo --summary` lists what is visible"
                }
                Backend::Cuda => {
                    "the cuda backend needs the NVIDIA driver (libcuda.so.1, `nvidia-smi` \
                     lists the GPUs) and NVRTC (libnvrtc.so from a CUDA toolkit, or `pip \
                     install nvidia-cuda-nvrtc-cu12` with its lib folder on LD_LIBRARY_PATH); \
                     without an NVIDIA GPU use --backend wgpu or cpu"
                }
                Backend::Tch => {
                    "libtorch could not use that device: for CUDA, install the CUDA build of \
                     torch (scripts/setup-libtorch.sh) on a machine with an NVIDIA driver; \
                     `--device cpu` always works"
                }
                Backend::Cpu => "",
            };
            bail!(
                "--backend {}: cannot use {what} ({detail}); {advice}",
                backend.name()
            )
        }
    }
}

fn device_unchecked(backend: Backend, spec: Option<&str>) -> Result<Device> {
    match backend {
        Backend::Cpu => match spec {
            None | Some("cpu") => Ok(Device::flex()),
            Some(other) => bail!("--device {other}: the cpu backend has one device, \"cpu\""),
        },
        Backend::Wgpu => wgpu_device(spec),
        Backend::Cuda => cuda_device(spec),
        Backend::Tch => tch_device(spec),
    }
}

#[cfg(feature = "wgpu")]
fn wgpu_device(spec: Option<&str>) -> Result<Device> {
    use burn::tensor::DeviceKind;
    let kind = match spec {
        None | Some("auto") => DeviceKind::DefaultDevice,
        Some("cpu") => DeviceKind::Cpu,
        Some(s) if s.starts_with("discrete") => DeviceKind::DiscreteGpu(index(s, "discrete")?),
        Some(s) if s.starts_with("integrated") => {
            DeviceKind::IntegratedGpu(index(s, "integrated")?)
        }
        Some(s) if s.starts_with("virtual") => DeviceKind::VirtualGpu(index(s, "virtual")?),
        Some(s) if s.starts_with("vulkan") => DeviceKind::DiscreteGpu(index(s, "vulkan")?),
        Some(other) => bail!(
            "--device {other}: wgpu devices are auto, discrete[:N], integrated[:N], virtual[:N] or cpu"
        ),
    };
    Ok(Device::wgpu(kind))
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_device(_: Option<&str>) -> Result<Device> {
    bail!(
        "this masklm was built without the wgpu backend; rebuild with \
         `cargo build --release -p masklm --features wgpu` (needs a Vulkan, Metal or DX12 driver)"
    )
}

#[cfg(feature = "cuda")]
fn cuda_device(spec: Option<&str>) -> Result<Device> {
    match spec {
        None => Ok(Device::cuda(0)),
        Some(s) if s.starts_with("cuda") => Ok(Device::cuda(index(s, "cuda")?)),
        Some(s) => match s.parse::<usize>() {
            Ok(i) => Ok(Device::cuda(i)),
            Err(_) => bail!("--device {s}: cuda devices are cuda[:N] or N"),
        },
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_: Option<&str>) -> Result<Device> {
    bail!(
        "this masklm was built without the cuda backend; rebuild with \
         `cargo build --release -p masklm --features cuda` (no CUDA toolkit needed to build; \
         running needs the NVIDIA driver and NVRTC)"
    )
}

/// Where the libtorch this process loaded lives: the folder of `libtorch_cpu.so` in
/// /proc/self/maps (LD_LIBRARY_PATH may have put another one there than the build's rpath).
#[cfg(feature = "tch")]
fn loaded_libtorch_dir() -> Option<std::path::PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let lib = maps
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| path.ends_with("/libtorch_cpu.so"))?;
    std::path::Path::new(lib).parent().map(|p| p.to_path_buf())
}

#[cfg_attr(not(feature = "tch"), allow(dead_code))]
/// The message for a libtorch whose `major.minor` differs from the one masklm was built
/// against, or `None` when they agree (or either is unknown).
fn libtorch_mismatch(built: &str, loaded: &str, loaded_from: &str) -> Option<String> {
    use libtorch_version::major_minor;
    if built.is_empty() || loaded.is_empty() || major_minor(built) == major_minor(loaded) {
        return None;
    }
    Some(format!(
        "this masklm was built against libtorch {built} but loaded libtorch {loaded} from \
         {loaded_from}; libtorch's C++ interface changes between versions (a mismatch fails \
         inside a kernel, e.g. \"Cannot access data pointer of Tensor that doesn't have \
         storage\"). burn-tch 0.22 needs torch 2.9: run scripts/setup-libtorch.sh, or unset \
         LD_LIBRARY_PATH so the build's own libtorch is used"
    ))
}

#[cfg(feature = "tch")]
#[allow(deprecated)] // burn 0.22 marks burn-tch deprecated; it is still the libtorch backend.
fn tch_device(spec: Option<&str>) -> Result<Device> {
    if let Some(dir) = loaded_libtorch_dir() {
        let loaded = libtorch_version::libtorch_version(&dir).unwrap_or_default();
        let built = env!("MASKLM_LIBTORCH_VERSION");
        if let Some(message) = libtorch_mismatch(built, &loaded, &dir.display().to_string()) {
            bail!(message);
        }
    }
    match spec {
        None | Some("cpu") => Ok(Device::libtorch()),
        Some("mps") => Ok(Device::libtorch_mps()),
        Some(s) if s.starts_with("cuda") => Ok(Device::libtorch_cuda(index(s, "cuda")?)),
        Some(other) => bail!("--device {other}: libtorch devices are cpu, cuda[:N] or mps"),
    }
}

#[cfg(not(feature = "tch"))]
fn tch_device(_: Option<&str>) -> Result<Device> {
    bail!(
        "this masklm was built without the libtorch backend; run scripts/setup-libtorch.sh, then \
         rebuild with `cargo build --release -p masklm --features tch`"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_always_there_and_missing_backends_say_how_to_get_them() {
        assert!(device(Backend::Cpu, None).is_ok());
        assert!(device(Backend::Cpu, Some("cpu")).is_ok());
        let msg = device(Backend::Cpu, Some("cuda:0"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("one device"), "{msg}");
        #[cfg(not(feature = "wgpu"))]
        {
            let msg = device(Backend::Wgpu, None).unwrap_err().to_string();
            assert!(msg.contains("--features wgpu"), "{msg}");
        }
        #[cfg(not(feature = "cuda"))]
        {
            let msg = device(Backend::Cuda, None).unwrap_err().to_string();
            assert!(msg.contains("--features cuda"), "{msg}");
        }
        #[cfg(not(feature = "tch"))]
        {
            let msg = device(Backend::Tch, Some("cuda:0"))
                .unwrap_err()
                .to_string();
            assert!(msg.contains("--features tch"), "{msg}");
        }
        assert_eq!(index("cuda:3", "cuda").unwrap(), 3);
        // A libtorch other than the one built against is refused with the versions named.
        let msg = libtorch_mismatch("2.9.0+cu128", "2.11.0+cu130", "/venv/torch/lib").unwrap();
        assert!(
            msg.contains("2.9.0+cu128") && msg.contains("2.11.0") && msg.contains("setup-libtorch")
        );
        assert_eq!(libtorch_mismatch("2.9.0+cu128", "2.9.1+cpu", "/x"), None);
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("torch/lib")).unwrap();
        std::fs::write(
            dir.path().join("torch/version.py"),
            "from typing import Optional\n__version__ = '2.11.0+cu130'\ngit_version = 'abc'\n",
        )
        .unwrap();
        let found = libtorch_version::libtorch_version(&dir.path().join("torch/lib")).unwrap();
        assert_eq!(found, "2.11.0+cu130");
        assert_eq!(index("cuda", "cuda").unwrap(), 0);
        assert!(index("cuda:x", "cuda").is_err());
    }
}
