//! Where a model runs: the `device` param of the stages that run one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceChoice {
    /// A GPU when this build has CUDA and the machine has an NVIDIA device,
    /// else the CPU; resolved while validating, so the cache key names the
    /// device that actually ran.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

impl DeviceChoice {
    /// `Auto` made concrete.
    pub fn resolved(self) -> DeviceChoice {
        match self {
            DeviceChoice::Auto if cfg!(feature = "cuda") && nvidia_device_present() => {
                DeviceChoice::Cuda
            }
            DeviceChoice::Auto => DeviceChoice::Cpu,
            concrete => concrete,
        }
    }

    /// The device to put in canonical params; refuses `cuda` in a build
    /// without it (the message is for the `device` param).
    pub fn check(self) -> Result<DeviceChoice, &'static str> {
        let device = self.resolved();
        if device == DeviceChoice::Cuda && !cfg!(feature = "cuda") {
            return Err("this xlpipe was built without CUDA (cargo build --features cuda)");
        }
        Ok(device)
    }

    /// Resources an instance on this device holds while it runs.
    pub fn resources(self) -> BTreeMap<String, u32> {
        match self.resolved() {
            DeviceChoice::Cuda => [("gpu".to_string(), 1)].into(),
            _ => BTreeMap::new(),
        }
    }

    /// Run `work` on burn's CPU backend, or on CUDA (`gpu`, the device the
    /// engine granted; the first when none was) in a build with it.
    pub fn run<W: OnBackend>(self, gpu: Option<u32>, work: W) -> anyhow::Result<W::Output> {
        match self.resolved() {
            DeviceChoice::Cpu | DeviceChoice::Auto => {
                // Which kernels this run's products use, in the stage's log.
                tracing::info!("{}", crate::cpu::describe());
                work.run::<burn::backend::Flex>(Default::default())
            }
            #[cfg(feature = "cuda")]
            DeviceChoice::Cuda => work.run::<burn::backend::Cuda>(Self::cuda_device(gpu)?),
            #[cfg(not(feature = "cuda"))]
            DeviceChoice::Cuda => {
                let _ = gpu;
                anyhow::bail!("this xlpipe was built without CUDA")
            }
        }
    }

    /// The GPU the engine granted this instance, once a probe shows that a
    /// CUDA driver works: without one, burn panics on a device thread.
    #[cfg(feature = "cuda")]
    fn cuda_device(gpu: Option<u32>) -> anyhow::Result<burn::backend::cuda::CudaDevice> {
        use burn::backend::cuda::CudaDevice;
        use burn::backend::Cuda;
        let probe = std::panic::catch_unwind(|| {
            burn::tensor::Tensor::<Cuda, 1>::zeros([1], &CudaDevice::new(0)).into_data()
        });
        probe.map_err(|_| {
            anyhow::anyhow!(
                "no usable CUDA device (is the NVIDIA driver installed?); use device = \"cpu\""
            )
        })?;
        Ok(CudaDevice::new(gpu.unwrap_or(0) as usize))
    }
}

/// Work that a stage runs on whichever burn backend its `device` param
/// names (see [`DeviceChoice::run`]); a training stage wraps the backend in
/// `Autodiff` itself.
pub trait OnBackend {
    type Output;
    fn run<B: burn::tensor::backend::Backend>(
        self,
        device: B::Device,
    ) -> anyhow::Result<Self::Output>;
}

/// The NVIDIA driver's control device: present where a GPU can be used.
fn nvidia_device_present() -> bool {
    std::path::Path::new("/dev/nvidiactl").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_resolves_to_a_device_this_build_can_use() {
        let device = DeviceChoice::Auto.check().unwrap();
        if cfg!(feature = "cuda") && nvidia_device_present() {
            assert_eq!(device, DeviceChoice::Cuda);
        } else {
            assert_eq!(device, DeviceChoice::Cpu);
            assert!(DeviceChoice::Auto.resources().is_empty());
        }
        assert_eq!(DeviceChoice::Cuda.check().is_ok(), cfg!(feature = "cuda"));
    }
}
