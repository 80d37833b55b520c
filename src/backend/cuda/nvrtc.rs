//! The NVRTC module cache: sources embedded by build.rs, compiled once per (content hash, architecture,
//! options) and kept on disk (`$ASGE_KERNEL_CACHE`, default `~/.cache/asge/kernels`) as PTX, with the compile
//! log in the error when a kernel does not compile.

use anyhow::{bail, Context, Result};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions, Ptx};
use std::path::PathBuf;

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// NVRTC options every kernel is compiled with. No fast math: the parity tests compare against f32 CPU math.
pub const OPTIONS: &[&str] = &["--std=c++17", "-lineinfo"];

/// True when libnvrtc can be opened (never panics).
pub fn available() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// The `extern "C"` entry points of a kernel source.
pub fn entry_points(source: &'static str) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut rest = source;
    while let Some(i) = rest.find("__global__ void") {
        rest = &rest[i + "__global__ void".len()..];
        let tail = rest.trim_start();
        let tail = tail.strip_prefix("__launch_bounds__(256)").map(str::trim_start).unwrap_or(tail);
        let end = tail.find('(').unwrap_or(0);
        let name = tail[..end].trim();
        if !name.is_empty() {
            out.push(name);
        }
    }
    out
}

/// Compiles one module for `arch` (e.g. `sm_90`) with NVRTC.
pub fn compile(module: &str, source: &str, arch: &str) -> Result<Ptx> {
    if !available() {
        bail!("NVRTC (libnvrtc.so) cannot be loaded");
    }
    let opts = CompileOptions {
        arch: Some(Box::leak(arch.to_string().into_boxed_str())),
        options: OPTIONS.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    compile_ptx_with_opts(source, opts).map_err(|e| match e {
        CompileError::CompileError { log, .. } => {
            anyhow::anyhow!("kernel {module}.cu does not compile for {arch}:\n{}", log.to_string_lossy())
        }
        other => anyhow::anyhow!("kernel {module}.cu: NVRTC failed for {arch}: {other:?}"),
    })
}

fn cache_dir() -> Option<PathBuf> {
    std::env::var_os("ASGE_KERNEL_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/asge/kernels")))
}

/// [`compile`], through the disk cache keyed by content hash, architecture and options.
pub fn compile_cached(module: &str, source: &str, hash: u64, arch: &str) -> Result<Ptx> {
    let opts_hash = OPTIONS.join(" ").bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
    let file = cache_dir().map(|d| d.join(format!("{module}-{hash:016x}-{opts_hash:08x}-{arch}.ptx")));
    if let Some(f) = &file {
        if let Ok(text) = std::fs::read_to_string(f) {
            return Ok(Ptx::from_src(text));
        }
    }
    let ptx = compile(module, source, arch)?;
    if let Some(f) = &file {
        // A failed cache write only costs a recompile next time.
        let _ = std::fs::create_dir_all(f.parent().unwrap())
            .and_then(|_| std::fs::write(f.with_extension("tmp"), ptx.to_src()))
            .and_then(|_| std::fs::rename(f.with_extension("tmp"), f));
    }
    Ok(ptx)
}

/// Compiles every kernel for `arch`: (module, Ok or the error), for `asge info` and the CI test.
pub fn compile_all(arch: &str) -> Vec<(&'static str, Result<()>)> {
    KERNELS.iter().map(|(m, src, _)| (*m, compile(m, src, arch).map(|_| ()).context("compile"))).collect()
}
