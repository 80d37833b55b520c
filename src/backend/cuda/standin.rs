//! The CUDA driver stand-in (`tests/emu/standin.cpp`, built by build.rs and embedded in this binary): a
//! `libcuda.so.1` that runs the real host code of this backend and the real kernels on the CPU, with memory
//! checking and real streams, so that `--device cuda` runs end to end on a machine without a GPU.
//!
//! Opt-in only: `ASGE_CUDA_STANDIN=1`. Then, before cudarc's first call, [`load`] writes the embedded library to
//! the cache folder and opens it by path, `RTLD_GLOBAL`; cudarc's own search for the driver then gets it by its
//! SONAME. cudarc tries `libcuda.so` and versioned names before `libcuda.so.1`, so a machine with a real driver
//! would get the real one for some calls: there the opt-in is an error that says so, never a silent mix.
//!
//! The stand-in's device is named "asge CUDA stand-in (H100 model)", so no log mistakes it for a GPU; its
//! timings measure the emulator. `ASGE_CUDA_STANDIN_DELAY=SEED[:MAX_US]` sleeps a seeded random time before each
//! queued operation (a missing cross-stream dependency then shows as a wrong result), `ASGE_CUDA_STANDIN_TRACE=1`
//! logs the first call of each driver function, `ASGE_CUDA_STANDIN_VERBOSE=1` every error.

use anyhow::{bail, Context, Result};
use std::ffi::{CStr, CString};
use std::sync::OnceLock;

/// The device name the stand-in reports.
pub const DEVICE_NAME: &str = "asge CUDA stand-in (H100 model)";

#[cfg(asge_standin)]
static LIBRARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/libcuda-standin.so"));
#[cfg(not(asge_standin))]
static LIBRARY: &[u8] = &[];

/// True when `ASGE_CUDA_STANDIN=1` asks for the stand-in.
pub fn requested() -> bool {
    std::env::var("ASGE_CUDA_STANDIN").is_ok_and(|v| v == "1")
}

/// True when this build embeds the stand-in.
pub fn built() -> bool {
    !LIBRARY.is_empty()
}

static HANDLE: OnceLock<Result<usize, String>> = OnceLock::new();

/// True once the stand-in is loaded in this process.
pub fn active() -> bool {
    HANDLE.get().is_some_and(|r| r.is_ok())
}

/// The library names cudarc tries for the driver, in its order; the stand-in answers to the last, `libcuda.so.1`.
fn driver_candidates() -> Vec<String> {
    cudarc::get_lib_name_candidates("cuda").into_iter().chain(cudarc::get_lib_name_candidates("nvcuda")).collect()
}

/// The last dlopen/dlsym error, as text (also NCCL's loader's).
pub(crate) fn dl_error() -> String {
    // SAFETY: dlerror returns null or a valid C string owned by libc.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        "unknown dlopen error".into()
    } else {
        // SAFETY: non-null, NUL-terminated.
        unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
    }
}

/// Loads the stand-in (once per process; later calls return the first call's result).
pub fn load() -> Result<()> {
    let r = HANDLE.get_or_init(|| load_once().map_err(|e| format!("{e:#}")));
    match r {
        Ok(_) => Ok(()),
        Err(e) => bail!("{e}"),
    }
}

fn load_once() -> Result<usize> {
    if !built() {
        bail!(
            "ASGE_CUDA_STANDIN=1: this build has no CUDA driver stand-in (no C++17 compiler when it was built); \
             rebuild with `c++` (or $CXX) on the PATH"
        );
    }
    // A real driver anywhere cudarc looks: refuse the mix.
    for name in driver_candidates() {
        let c = CString::new(name.clone()).expect("a library name");
        // SAFETY: dlopen of a library name; closed again at once.
        let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL) };
        if !h.is_null() {
            // SAFETY: h is a handle dlopen just returned.
            unsafe { libc::dlclose(h) };
            bail!(
                "ASGE_CUDA_STANDIN=1, but a CUDA driver ({name}) is installed here, which cudarc would load before \
                 the stand-in; unset ASGE_CUDA_STANDIN to use the GPU"
            );
        }
    }
    let dir = cache_dir().join("standin");
    std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create the stand-in's folder", dir.display()))?;
    let hash = crate::rng::fnv1a(crate::rng::FNV_OFFSET, LIBRARY);
    let path = dir.join(format!("libcuda-standin-{hash:016x}.so"));
    let current = std::fs::read(&path).ok();
    if current.as_deref() != Some(LIBRARY) {
        crate::files::write_atomic(&path, LIBRARY)
            .with_context(|| format!("{}: cannot write the stand-in", path.display()))?;
    }
    let c = CString::new(path.to_string_lossy().into_owned()).context("the stand-in's path")?;
    // SAFETY: the library is this build's stand-in, written (or checked byte for byte) just now.
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if h.is_null() {
        bail!("{}: cannot load the CUDA stand-in ({})", path.display(), dl_error());
    }
    // SAFETY: a symbol lookup in the handle just opened.
    let name = unsafe { libc::dlsym(h, c"asge_standin_name".as_ptr()) };
    if name.is_null() {
        bail!("{}: not the asge CUDA stand-in", path.display());
    }
    Ok(h as usize)
}

/// `$XDG_CACHE_HOME/asge` or `~/.cache/asge` (the kernel cache's parent), else the temporary folder.
fn cache_dir() -> std::path::PathBuf {
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return std::path::PathBuf::from(d).join("asge");
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(h) => std::path::PathBuf::from(h).join(".cache/asge"),
        None => std::env::temp_dir().join("asge"),
    }
}

/// The loaded stand-in's handle (for its NCCL functions, `crate::dist::nccl`), when it is loaded.
pub fn handle() -> Option<*mut libc::c_void> {
    match HANDLE.get() {
        Some(Ok(h)) => Some(*h as *mut libc::c_void),
        _ => None,
    }
}

/// A symbol of the loaded stand-in (its test hooks), or an error when it is not loaded.
fn symbol(name: &CStr) -> Result<*mut libc::c_void> {
    let Some(Ok(h)) = HANDLE.get() else { bail!("the CUDA stand-in is not loaded") };
    // SAFETY: a lookup in a handle dlopen returned, never closed.
    let p = unsafe { libc::dlsym(*h as *mut libc::c_void, name.as_ptr()) };
    if p.is_null() {
        bail!("the CUDA stand-in has no {}", name.to_string_lossy());
    }
    Ok(p)
}

/// Holds (`true`) or releases a stream's queue in the stand-in: its operations wait, in order, until released.
/// For tests that prove an ordering without relying on timing.
pub fn hold_stream(stream: &cudarc::driver::CudaStream, hold: bool) -> Result<()> {
    let f: extern "C" fn(*mut libc::c_void, i32) -> i32 =
        // SAFETY: the hook's C signature in tests/emu/standin.cpp.
        unsafe { std::mem::transmute(symbol(c"asge_standin_hold_stream")?) };
    let r = f(stream.cu_stream() as *mut libc::c_void, hold as i32);
    anyhow::ensure!(r == 0, "asge_standin_hold_stream: error {r}");
    Ok(())
}

/// Operations queued on a stream that have not run yet.
pub fn pending(stream: &cudarc::driver::CudaStream) -> Result<i64> {
    let f: extern "C" fn(*mut libc::c_void) -> i64 =
        // SAFETY: the hook's C signature in tests/emu/standin.cpp.
        unsafe { std::mem::transmute(symbol(c"asge_standin_pending")?) };
    Ok(f(stream.cu_stream() as *mut libc::c_void))
}

/// True when the stand-in's tensor cores accumulate by truncation (`ASGE_STANDIN_MMA_ROUNDING=truncate`, read
/// when it is loaded), as Hopper's do; false for round-to-nearest.
pub fn mma_truncates() -> Result<bool> {
    let f: extern "C" fn() -> i32 =
        // SAFETY: the hook's C signature in tests/emu/standin.cpp.
        unsafe { std::mem::transmute(symbol(c"asge_standin_mma_truncates")?) };
    Ok(f() == 1)
}

/// One kernel run by the stand-in's emulator, from its launch log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    pub kernel: String,
    pub grid: (u32, u32, u32),
    pub threads: u32,
    pub shared_bytes: u32,
    /// The stream it ran on (`CudaStream::cu_stream` as an integer).
    pub stream: u64,
    /// Warp-level MMAs it issued.
    pub mmas: u64,
}

/// The number of kernels the stand-in has run so far (a mark for [`launches_since`]).
pub fn launches_logged() -> Result<u64> {
    Ok(launch_log(u64::MAX)?.1)
}

/// Every kernel the stand-in ran after `mark` ([`launches_logged`]), in order, graph replays included.
pub fn launches_since(mark: u64) -> Result<Vec<Launch>> {
    let (text, _) = launch_log(mark)?;
    text.lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let n = |i: usize| -> Result<u64> {
                f.get(i).and_then(|v| v.parse().ok()).with_context(|| format!("the stand-in's launch log: {l:?}"))
            };
            Ok(Launch {
                kernel: f[0].to_string(),
                grid: (n(1)? as u32, n(2)? as u32, n(3)? as u32),
                threads: n(4)? as u32,
                shared_bytes: n(5)? as u32,
                stream: n(6)?,
                mmas: n(7)?,
            })
        })
        .collect()
}

fn launch_log(from: u64) -> Result<(String, u64)> {
    let f: extern "C" fn(u64, *mut libc::c_char, u64, *mut u64) -> u64 =
        // SAFETY: the hook's C signature in tests/emu/standin.cpp.
        unsafe { std::mem::transmute(symbol(c"asge_standin_launch_log")?) };
    let mut total = 0u64;
    let mut buf: Vec<u8> = vec![0; 1 << 16];
    loop {
        let need = f(from, buf.as_mut_ptr() as *mut libc::c_char, buf.len() as u64, &mut total);
        if need as usize <= buf.len() {
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            return Ok((String::from_utf8_lossy(&buf[..end]).into_owned(), total));
        }
        buf.resize(need as usize, 0);
    }
}

/// The emulator's work so far.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    pub launches: u64,
    /// Warp-level `mma.sync.m16n8k16`s: 4096 FLOP each.
    pub mmas: u64,
    pub blocks: u64,
    pub kernel_ms: f64,
}

pub fn counters() -> Result<Counters> {
    let f: extern "C" fn(*mut u64, *mut u64, *mut u64, *mut f64) =
        // SAFETY: the hook's C signature in tests/emu/standin.cpp.
        unsafe { std::mem::transmute(symbol(c"asge_standin_counters")?) };
    let mut c = Counters::default();
    f(&mut c.launches, &mut c.mmas, &mut c.blocks, &mut c.kernel_ms);
    Ok(c)
}
