//! Where a model runs: the `device` param of the stages that run one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ParamError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceChoice {
    #[default]
    Cpu,
    Cuda,
}

impl DeviceChoice {
    /// Refuse `cuda` while validating, in a build without it.
    pub fn check(self) -> Result<(), ParamError> {
        if self == DeviceChoice::Cuda && !cfg!(feature = "cuda") {
            return Err(ParamError::new(
                "device",
                "this xlpipe was built without CUDA (cargo build --features cuda)",
            ));
        }
        Ok(())
    }

    /// Resources an instance on this device holds while it runs.
    pub fn resources(self) -> BTreeMap<String, u32> {
        match self {
            DeviceChoice::Cpu => BTreeMap::new(),
            DeviceChoice::Cuda => [("gpu".to_string(), 1)].into(),
        }
    }

    /// The GPU the engine granted this instance, once a probe shows that a
    /// CUDA driver works: without one, burn panics on a device thread.
    #[cfg(feature = "cuda")]
    pub fn cuda_device(
        ctx: &crate::StageContext,
    ) -> anyhow::Result<burn::backend::cuda::CudaDevice> {
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
        let index = ctx
            .devices
            .get("gpu")
            .and_then(|d| d.first())
            .copied()
            .unwrap_or(0);
        Ok(CudaDevice::new(index as usize))
    }
}
