//! The root config's `device:` value and the burn device it resolves to on one rank.
//!
//! `cpu` is burn's flex backend; `cuda` is burn's CubeCL CUDA backend (cargo feature
//! `cuda`), one GPU per rank: `cuda` alone takes the rank's local rank as the GPU index,
//! `cuda:N` names it. Training wraps either in autodiff.

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// `device: cpu | cuda | cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceConfig {
    #[default]
    Cpu,
    /// `None`: the rank's local rank picks the GPU.
    Cuda(Option<usize>),
}

/// Whether this binary was built with burn's CUDA backend (cargo feature `cuda`).
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

/// Why a configured device cannot be used here.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(
        "device `{0}` needs the CUDA backend, but this switchyard was built without it; \
         rebuild with `cargo build --release --features cuda`"
    )]
    NotBuilt(DeviceConfig),
    #[error("device `{device}`: CUDA is not usable here: {reason}")]
    Unavailable {
        device: DeviceConfig,
        reason: String,
    },
    #[error(
        "device `{device}`: GPU {index} does not exist (this machine has {count}); with \
         `device: cuda` each rank takes the GPU of its local rank, so start at most {count} \
         ranks per node"
    )]
    NoSuchGpu {
        device: DeviceConfig,
        index: usize,
        count: usize,
    },
}

impl DeviceConfig {
    pub fn is_cuda(self) -> bool {
        matches!(self, DeviceConfig::Cuda(_))
    }

    /// The autodiff device of a rank whose local rank (its index among the ranks of its
    /// node) is `local_rank`. Checks that CUDA is present before burn touches it (the
    /// driver library is loaded at run time; its absence would be a panic in cudarc).
    pub fn resolve(self, local_rank: usize) -> Result<Device, DeviceError> {
        match self {
            DeviceConfig::Cpu => Ok(Device::flex().autodiff()),
            DeviceConfig::Cuda(index) => cuda_device(self, index.unwrap_or(local_rank)),
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(device: DeviceConfig, index: usize) -> Result<Device, DeviceError> {
    let count = switchyard_parallel::cuda::probe().map_err(|e| DeviceError::Unavailable {
        device,
        reason: e.to_string(),
    })?;
    if index >= count {
        return Err(DeviceError::NoSuchGpu {
            device,
            index,
            count,
        });
    }
    Ok(Device::cuda(index).autodiff())
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(device: DeviceConfig, _: usize) -> Result<Device, DeviceError> {
    Err(DeviceError::NotBuilt(device))
}

impl fmt::Display for DeviceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceConfig::Cpu => f.write_str("cpu"),
            DeviceConfig::Cuda(None) => f.write_str("cuda"),
            DeviceConfig::Cuda(Some(n)) => write!(f, "cuda:{n}"),
        }
    }
}

impl FromStr for DeviceConfig {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hint = "expected `cpu`, `cuda` (the GPU of the rank's local rank) or `cuda:N`";
        match s {
            "cpu" => Ok(DeviceConfig::Cpu),
            "cuda" => Ok(DeviceConfig::Cuda(None)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceConfig::Cuda(Some(n))),
                _ => Err(format!("unknown device `{s}`; {hint}")),
            },
        }
    }
}

impl Serialize for DeviceConfig {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_every_form() {
        for (text, value) in [
            ("cpu", DeviceConfig::Cpu),
            ("cuda", DeviceConfig::Cuda(None)),
            ("cuda:3", DeviceConfig::Cuda(Some(3))),
        ] {
            assert_eq!(text.parse::<DeviceConfig>().unwrap(), value);
            assert_eq!(value.to_string(), text);
        }
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "CPU"] {
            assert!(bad.parse::<DeviceConfig>().is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn cpu_resolves_to_autodiff_flex() {
        let device = DeviceConfig::Cpu.resolve(5).unwrap();
        assert!(device.is_autodiff());
        assert_eq!(device.inner(), Device::flex());
    }

    /// Without the feature: an error naming the rebuild; with it but no GPU here: an error,
    /// not a panic; with a GPU: a CUDA device.
    #[test]
    fn cuda_is_an_error_not_a_panic_when_unusable() {
        let built = CUDA_BUILT;
        match DeviceConfig::Cuda(None).resolve(0) {
            Err(e @ DeviceError::NotBuilt(_)) => {
                assert!(!built);
                assert!(e.to_string().contains("--features cuda"), "{e}");
            }
            Err(e) => {
                assert!(built);
                println!("skipped: {e}");
            }
            Ok(device) => assert!(built && device.is_autodiff()),
        }
        assert!(DeviceConfig::Cuda(Some(1 << 20)).resolve(0).is_err());
    }
}
