//! The NVRTC module cache: sources embedded by build.rs, compiled once per (content hash, architecture,
//! options, format) and kept on disk (`$ASGE_KERNEL_CACHE`, default `~/.cache/asge/kernels`), with the compile
//! log in the error when a kernel does not compile.
//!
//! Format: PTX, which the driver JIT-compiles when the module loads, unless the driver is older than NVRTC
//! (its JIT then rejects NVRTC's newer PTX ISA): then CUBIN, machine code NVRTC assembles for the exact
//! architecture, which needs no JIT. `ASGE_KERNEL_FORMAT=ptx|cubin` forces one.

use anyhow::{bail, Context, Result};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions, Ptx};
use std::path::PathBuf;

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// NVRTC options every kernel is compiled with. No fast math: the parity tests compare against f32 CPU math.
pub const OPTIONS: &[&str] = &["--std=c++17", "-lineinfo"];

/// How to get NVRTC, for the errors that need it (the CUDA backend compiles its kernels at run time, on a GPU and
/// under the driver stand-in alike).
pub const GET_NVRTC: &str = "Get it from the CUDA toolkit (its lib64) or from PyPI without one: \
    `pip install --target ~/.cache/asge-nvrtc nvidia-cuda-nvrtc==13.0.88`, then \
    `export LD_LIBRARY_PATH=~/.cache/asge-nvrtc/nvidia/cu13/lib:$LD_LIBRARY_PATH`";

/// True when libnvrtc can be opened (never panics).
pub fn available() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// The NVRTC library cudarc will load: the first of its candidate names (unversioned first) that opens, with the
/// file it resolves to. None when none opens.
pub fn library_path() -> Option<(String, String)> {
    for name in cudarc::get_lib_name_candidates("nvrtc") {
        let c = std::ffi::CString::new(name.clone()).ok()?;
        // SAFETY: dlopen of a library name; the handle is closed again.
        let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL) };
        if h.is_null() {
            continue;
        }
        let mut path = name.clone();
        // SAFETY: dlsym in a live handle, dladdr on the symbol it returned.
        unsafe {
            let sym = libc::dlsym(h, c"nvrtcVersion".as_ptr());
            let mut info: libc::Dl_info = std::mem::zeroed();
            if !sym.is_null() && libc::dladdr(sym, &mut info) != 0 && !info.dli_fname.is_null() {
                path = std::ffi::CStr::from_ptr(info.dli_fname).to_string_lossy().into_owned();
            }
            libc::dlclose(h);
        }
        return Some((name, path));
    }
    None
}

/// The oldest NVRTC whose PTX the engine's kernels are tested with (CUDA 13.0).
pub const MIN_VERSION: i32 = 13000;

/// Checks the NVRTC library that will be used: present, not older than 13.0 (cudarc tries unversioned names
/// first, so an older toolkit's `libnvrtc.so` on the path would win over the wheel's `libnvrtc.so.13`), and its
/// builtins library next to it (NVRTC loads `libnvrtc-builtins.so.<major>.<minor>` from its own folder).
pub fn check_library() -> Result<()> {
    let Some((name, path)) = library_path() else {
        bail!("no NVRTC library (libnvrtc.so.13). {GET_NVRTC}");
    };
    let v = version().unwrap_or(0);
    if v < MIN_VERSION {
        bail!(
            "NVRTC {}.{} found first ({name} -> {path}): asge needs 13.0 or newer; put CUDA 13's lib64 earlier on LD_LIBRARY_PATH",
            v / 1000,
            (v % 1000) / 10
        );
    }
    let dir = std::path::Path::new(&path).parent().map(|d| d.to_path_buf()).unwrap_or_default();
    let builtins = format!("libnvrtc-builtins.so.{}.{}", v / 1000, (v % 1000) / 10);
    if path.contains('/') && !dir.join(&builtins).exists() {
        bail!("{path}: NVRTC's {builtins} is not next to it, and NVRTC cannot compile without it");
    }
    Ok(())
}

/// The `extern "C"` entry points of a kernel source.
pub fn entry_points(source: &'static str) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut rest = source;
    while let Some(i) = rest.find("__global__ void") {
        rest = &rest[i + "__global__ void".len()..];
        let tail = rest.trim_start();
        // Skip `__launch_bounds__(...)` whatever its arguments.
        let tail = match tail.strip_prefix("__launch_bounds__(") {
            Some(t) => t.find(')').map_or(t, |i| t[i + 1..].trim_start()),
            None => tail,
        };
        let end = tail.find('(').unwrap_or(0);
        let name = tail[..end].trim();
        if !name.is_empty() {
            out.push(name);
        }
    }
    out
}

/// What NVRTC hands the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Ptx,
    Cubin,
}

impl Format {
    fn ext(self) -> &'static str {
        match self {
            Format::Ptx => "ptx",
            Format::Cubin => "cubin",
        }
    }
}

/// NVRTC's version as `major * 1000 + minor * 10` (the driver's encoding), or None when it cannot be loaded.
pub fn version() -> Option<i32> {
    if !available() {
        return None;
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two out-parameters; the library is present.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    (r == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS).then_some(major * 1000 + minor * 10)
}

/// The format for a driver of CUDA version `driver` (e.g. 13000): `$ASGE_KERNEL_FORMAT`, else CUBIN when the
/// driver is older than NVRTC, else PTX.
pub fn format_for(driver: i32) -> Result<Format> {
    format_from(std::env::var("ASGE_KERNEL_FORMAT").ok().as_deref(), driver)
}

/// [`format_for`] with the variable's value given (`None`: unset).
pub fn format_from(forced: Option<&str>, driver: i32) -> Result<Format> {
    match forced {
        Some("ptx") => Ok(Format::Ptx),
        Some("cubin") => Ok(Format::Cubin),
        Some(other) => bail!("ASGE_KERNEL_FORMAT={other}: expected ptx or cubin"),
        None => Ok(if version().is_some_and(|v| driver < v) { Format::Cubin } else { Format::Ptx }),
    }
}

/// Compiles one module for `arch` (e.g. `sm_90`) to CUBIN with NVRTC: machine code for that architecture.
pub fn compile_cubin(module: &str, source: &str, arch: &str) -> Result<Vec<u8>> {
    compile_cubin_with(module, source, arch, &[]).map(|(cubin, _)| cubin)
}

/// What ptxas reports for one kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelResources {
    pub kernel: String,
    pub registers: u32,
    pub spill_bytes: u32,
    /// Per-thread local memory for arrays indexed at run time (and calls): memory traffic like a spill's.
    pub stack_bytes: u32,
    pub shared_bytes: u32,
}

/// Registers, spills and shared memory of every kernel of every module for `arch`, from ptxas' verbose report
/// (NVRTC assembles the CUBIN, so no GPU is needed).
pub fn resources(arch: &str) -> Result<Vec<KernelResources>> {
    let mut out = Vec::new();
    for (module, source, _) in KERNELS {
        let (_, log) = compile_cubin_with(module, source, arch, &["--ptxas-options=-v"])?;
        let mut cur: Option<KernelResources> = None;
        for line in log.lines() {
            let num_before = |key: &str| {
                line.find(key).and_then(|i| line[..i].split_whitespace().last()).and_then(|n| n.parse::<u32>().ok())
            };
            if let Some(rest) = line.split("Compiling entry function '").nth(1) {
                out.extend(cur.take());
                let kernel = rest.split('\'').next().unwrap_or_default().to_string();
                cur = Some(KernelResources { kernel, registers: 0, spill_bytes: 0, stack_bytes: 0, shared_bytes: 0 });
            } else if let Some(k) = cur.as_mut() {
                if let Some(n) = num_before("bytes spill stores") {
                    k.spill_bytes += n;
                }
                if let Some(n) = num_before("bytes spill loads") {
                    k.spill_bytes += n;
                }
                // Device functions called by the kernel report their own frames after it: keep the largest.
                if let Some(n) = num_before("bytes stack frame") {
                    k.stack_bytes = k.stack_bytes.max(n);
                }
                if let Some(n) = num_before("registers") {
                    k.registers = n;
                }
                if let Some(n) = num_before("bytes smem") {
                    k.shared_bytes = n;
                }
            }
        }
        out.extend(cur);
    }
    Ok(out)
}

/// [`compile_cubin`] with extra NVRTC options; also returns the program log.
fn compile_cubin_with(module: &str, source: &str, arch: &str, extra: &[&str]) -> Result<(Vec<u8>, String)> {
    use cudarc::nvrtc::{result, sys};
    use std::ffi::{CStr, CString};
    if !available() {
        bail!("NVRTC (libnvrtc.so.13) cannot be loaded. {GET_NVRTC}");
    }
    let src = CString::new(source).context("kernel source holds a NUL byte")?;
    let name = CString::new(format!("{module}.cu")).context("kernel name")?;
    let prog = result::create_program(&src, Some(&name))
        .map_err(|e| anyhow::anyhow!("kernel {module}.cu: NVRTC cannot create a program: {e:?}"))?;
    let mut options: Vec<String> = OPTIONS.iter().map(|s| s.to_string()).collect();
    // A real architecture (sm_XX, not compute_XX) makes NVRTC assemble machine code.
    options.push(format!("--gpu-architecture={arch}"));
    options.extend(extra.iter().map(|s| s.to_string()));
    // SAFETY: prog was just created and is destroyed exactly once below; the out-buffers are sized by the
    // matching size queries.
    let out = unsafe {
        let r = match result::compile_program(prog, &options) {
            Err(e) => {
                let log = result::get_program_log(prog)
                    .map(|l| CStr::from_ptr(l.as_ptr()).to_string_lossy().into_owned())
                    .unwrap_or_default();
                Err(anyhow::anyhow!("kernel {module}.cu does not compile for {arch} ({e:?}):\n{log}"))
            }
            Ok(()) => {
                let mut size = 0usize;
                let mut ok = sys::nvrtcGetCUBINSize(prog, &mut size) == sys::nvrtcResult::NVRTC_SUCCESS;
                let mut cubin = vec![0u8; size];
                ok = ok
                    && size > 0
                    && sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast()) == sys::nvrtcResult::NVRTC_SUCCESS;
                let log = result::get_program_log(prog)
                    .map(|l| CStr::from_ptr(l.as_ptr()).to_string_lossy().into_owned())
                    .unwrap_or_default();
                if ok {
                    Ok((cubin, log))
                } else {
                    Err(anyhow::anyhow!("kernel {module}.cu: NVRTC produced no CUBIN for {arch}"))
                }
            }
        };
        let _ = result::destroy_program(prog);
        r
    };
    out
}

/// Compiles one module for `arch` (e.g. `sm_90`) with NVRTC.
pub fn compile(module: &str, source: &str, arch: &str) -> Result<Ptx> {
    if !available() {
        bail!("NVRTC (libnvrtc.so.13) cannot be loaded. {GET_NVRTC}");
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
    cache_dir_from(std::env::var_os("ASGE_KERNEL_CACHE"), std::env::var_os("HOME"))
}

/// The kernel cache from `ASGE_KERNEL_CACHE` and `HOME`. Empty counts as unset: an empty path would be the current
/// directory.
fn cache_dir_from(var: Option<std::ffi::OsString>, home: Option<std::ffi::OsString>) -> Option<PathBuf> {
    var.filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| home.filter(|h| !h.is_empty()).map(|h| PathBuf::from(h).join(".cache/asge/kernels")))
}

/// [`compile`] or [`compile_cubin`], through the disk cache (`$ASGE_KERNEL_CACHE`) keyed by content hash,
/// architecture, options, format and the NVRTC version (another compiler never reuses a cached file). The driver
/// is not in the key: what NVRTC writes does not depend on it (a driver JITs PTX when it loads it), so kernels
/// compiled elsewhere (a GPU machine's bundle) serve any driver.
pub fn compile_cached(module: &str, source: &str, hash: u64, arch: &str, format: Format) -> Result<Ptx> {
    compile_cached_in(cache_dir().as_deref(), module, source, hash, arch, format)
}

/// [`compile_cached`] with the cache folder given (`None`: no cache).
pub fn compile_cached_in(
    dir: Option<&std::path::Path>,
    module: &str,
    source: &str,
    hash: u64,
    arch: &str,
    format: Format,
) -> Result<Ptx> {
    let opts_hash = OPTIONS.join(" ").bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
    let nvrtc = version().unwrap_or(0);
    let file =
        dir.map(|d| d.join(format!("{module}-{hash:016x}-{opts_hash:08x}-{arch}-nvrtc{nvrtc}.{}", format.ext())));
    // Without NVRTC (a GPU machine whose bundle carries the compiled kernels), any compiler's file for this exact
    // source, options, architecture and driver will do: there is nothing to compile it with anyway.
    let file = match (&file, available()) {
        (Some(f), false) if !f.exists() => cached_by_any_nvrtc(f).or(file),
        _ => file,
    };
    if let Some(f) = &file {
        match format {
            Format::Ptx => {
                if let Ok(text) = std::fs::read_to_string(f) {
                    return Ok(Ptx::from_src(text));
                }
            }
            Format::Cubin => {
                if let Ok(bytes) = std::fs::read(f) {
                    return Ok(Ptx::from_binary(bytes));
                }
            }
        }
    }
    if !available() {
        bail!(
            "kernel {module}.cu: not in the kernel cache ({}) for {arch}, and no NVRTC (libnvrtc.so.13) to compile it. \
             {GET_NVRTC}",
            dir.map(|d| d.display().to_string()).unwrap_or_else(|| "none".into())
        );
    }
    let bytes = match format {
        Format::Ptx => compile(module, source, arch)?.to_src().into_bytes(),
        Format::Cubin => compile_cubin(module, source, arch)?,
    };
    if let Some(f) = &file {
        // A failed cache write only costs a recompile next time. The temporary file's name is unique to this
        // process and call, so two processes compiling at once each rename a whole file into place.
        if let Some(dir) = f.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let _ = crate::files::write_atomic(f, &bytes);
    }
    Ok(match format {
        Format::Ptx => Ptx::from_src(String::from_utf8(bytes).context("NVRTC's PTX is not UTF-8")?),
        Format::Cubin => Ptx::from_binary(bytes),
    })
}

/// A cached file like `f` but made by another NVRTC version (`...-nvrtcN.ext`).
fn cached_by_any_nvrtc(f: &std::path::Path) -> Option<PathBuf> {
    let name = f.file_name()?.to_str()?;
    let (head, tail) = name.split_once("-nvrtc")?;
    let tail = &tail[tail.find('.')?..];
    std::fs::read_dir(f.parent()?).ok()?.filter_map(|e| e.ok()).map(|e| e.path()).find(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(&format!("{head}-nvrtc")) && n.ends_with(tail))
    })
}

/// Compiles every kernel for `arch`: (module, Ok or the error), for `asge info` and the CI test.
pub fn compile_all(arch: &str) -> Vec<(&'static str, Result<()>)> {
    KERNELS.iter().map(|(m, src, _)| (*m, compile(m, src, arch).map(|_| ()).context("compile"))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_kernel_cache_variable_is_unset_not_the_current_directory() {
        let some = |s: &str| Some(std::ffi::OsString::from(s));
        assert_eq!(cache_dir_from(some(""), some("/h")), Some(PathBuf::from("/h/.cache/asge/kernels")));
        assert_eq!(cache_dir_from(some("/k"), some("/h")), Some(PathBuf::from("/k")));
        assert_eq!(cache_dir_from(some(""), some("")), None);
        assert_eq!(cache_dir_from(None, None), None);
    }
}
