//! Choosing a backend by `--device`: the one place that knows which backends a build has. The trainer,
//! evaluation and prediction are generic over [`Backend`](super::Backend); [`with_backend!`] instantiates
//! them for the device named.

use anyhow::{bail, Result};

/// A `--device` value.
pub enum Choice {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(usize),
}

/// Parses `--device`: `cpu`, `cuda` or `cuda:N` (a clear error for anything else, or for cuda in a build
/// without the CUDA backend).
pub fn device(name: &str) -> Result<Choice> {
    match name {
        "cpu" => Ok(Choice::Cpu),
        d if d == "cuda" || d.starts_with("cuda:") => {
            // One of several ranks: `cuda` is the rank's own GPU, cuda:LOCAL_RANK.
            #[cfg(feature = "cuda")]
            return Ok(Choice::Cuda(match crate::dist::group::current() {
                Some(g) if d == "cuda" => g.world.local_rank,
                _ => crate::backend::cuda::parse_device(d)?,
            }));
            #[cfg(not(feature = "cuda"))]
            bail!("--device {d}: this build has no CUDA backend (build with the `cuda` feature)")
        }
        d => bail!("--device {d}: unknown device (expected cpu, cuda or cuda:N)"),
    }
}

/// Calls `$body` with `$be` bound to a maker of the backend `--device` names, in `precision` (the trainer is
/// generic over backends).
macro_rules! with_backend {
    ($device:expr, $precision:expr, |$be:ident| $body:expr) => {
        match $crate::backend::select::device($device)? {
            $crate::backend::select::Choice::Cpu => {
                let $be = || -> anyhow::Result<$crate::backend::cpu::CpuBackend> {
                    Ok($crate::backend::cpu::CpuBackend::new().with_precision($precision))
                };
                $body
            }
            #[cfg(feature = "cuda")]
            $crate::backend::select::Choice::Cuda(n) => {
                let $be = || $crate::backend::cuda::CudaBackend::new(n).map(|b| b.with_precision($precision));
                $body
            }
        }
    };
}
pub(crate) use with_backend;
