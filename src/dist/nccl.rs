//! NCCL, opened at run time like the other CUDA libraries, with its entry points bound here.
//!
//! cudarc's `nccl` module asks dlopen for `libnccl.so`, `libnccl64*.so` and `libnccl.so.{13,12,...}`, never for
//! NCCL's soname `libnccl.so.2` (what the system package and the `nvidia-nccl-cu13` wheel install), and its safe
//! `Comm` keeps the communicator private (no asynchronous-error query) and panics in `Drop` when an abort fails.
//! So the library is opened here: `ASGE_NCCL` (a path), else `libnccl.so.2`, then `libnccl.so`, through the usual
//! search path (`LD_LIBRARY_PATH`); the calls are NCCL's C functions with cudarc's `nccl::sys` types, each
//! result checked. Under the driver stand-in (`ASGE_CUDA_STANDIN=1`) the stand-in itself carries the NCCL
//! functions (tests/emu/standin/nccl.inc): collectives between the processes of one machine.

use anyhow::{bail, ensure, Context, Result};
use cudarc::nccl::sys::{ncclComm_t, ncclDataType_t, ncclRedOp_t, ncclUniqueId};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::OnceLock;

type Res = c_int;
type Stream = cudarc::driver::sys::CUstream;

type GetVersion = unsafe extern "C" fn(*mut c_int) -> Res;
type GetUniqueId = unsafe extern "C" fn(*mut ncclUniqueId) -> Res;
type CommInitRank = unsafe extern "C" fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int) -> Res;
type AllReduce =
    unsafe extern "C" fn(*const c_void, *mut c_void, usize, ncclDataType_t, ncclRedOp_t, ncclComm_t, Stream) -> Res;
type Broadcast =
    unsafe extern "C" fn(*const c_void, *mut c_void, usize, ncclDataType_t, c_int, ncclComm_t, Stream) -> Res;
type SendFn = unsafe extern "C" fn(*const c_void, usize, ncclDataType_t, c_int, ncclComm_t, Stream) -> Res;
type RecvFn = unsafe extern "C" fn(*mut c_void, usize, ncclDataType_t, c_int, ncclComm_t, Stream) -> Res;
type Group = unsafe extern "C" fn() -> Res;
type CommAsyncError = unsafe extern "C" fn(ncclComm_t, *mut Res) -> Res;
type CommCall = unsafe extern "C" fn(ncclComm_t) -> Res;
type ErrorString = unsafe extern "C" fn(Res) -> *const c_char;
type LastError = unsafe extern "C" fn(ncclComm_t) -> *const c_char;

/// The NCCL functions the engine calls.
pub struct Nccl {
    /// The file the functions came from, and NCCL's version (e.g. 2.27.3).
    pub file: String,
    pub version: String,
    get_version: GetVersion,
    get_unique_id: GetUniqueId,
    comm_init_rank: CommInitRank,
    all_reduce: AllReduce,
    broadcast: Broadcast,
    send: SendFn,
    recv: RecvFn,
    group_start: Group,
    group_end: Group,
    comm_get_async_error: CommAsyncError,
    comm_abort: CommCall,
    comm_destroy: CommCall,
    get_error_string: ErrorString,
    get_last_error: LastError,
}

// SAFETY: function pointers into a library that stays loaded for the process's life; NCCL's functions are
// callable from any thread (a communicator is used by one thread at a time, which `Comm` ensures).
unsafe impl Send for Nccl {}
unsafe impl Sync for Nccl {}

static LOADED: OnceLock<Result<Nccl, String>> = OnceLock::new();

/// NCCL, loaded once per process (later calls return the first call's result).
pub fn load() -> Result<&'static Nccl> {
    match LOADED.get_or_init(|| load_once().map_err(|e| format!("{e:#}"))) {
        Ok(n) => Ok(n),
        Err(e) => bail!("{e}"),
    }
}

use crate::backend::cuda::standin::dl_error;

/// Opens the library: the stand-in's handle under `ASGE_CUDA_STANDIN=1`, else `ASGE_NCCL` or NCCL's names.
fn open() -> Result<(*mut c_void, String)> {
    if crate::backend::cuda::standin::requested() {
        crate::backend::cuda::standin::load()?;
        let h = crate::backend::cuda::standin::handle().context("the CUDA stand-in is not loaded")?;
        return Ok((h, "the asge CUDA stand-in's NCCL (not NCCL: collectives between processes)".into()));
    }
    let names: Vec<String> = match std::env::var("ASGE_NCCL") {
        Ok(p) if !p.is_empty() => vec![p],
        _ => vec!["libnccl.so.2".into(), "libnccl.so".into()],
    };
    let mut tried = Vec::new();
    for name in &names {
        let c = CString::new(name.as_str()).context("ASGE_NCCL holds a NUL byte")?;
        // SAFETY: dlopen of a library by name or path; NCCL's initialisers run, as they would when linked.
        let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if !h.is_null() {
            return Ok((h, name.clone()));
        }
        tried.push(format!("{name}: {}", dl_error()));
    }
    bail!(
        "NCCL cannot be loaded ({}); install it (the system package libnccl2, or `pip install nvidia-nccl-cu13` and \
         put its nvidia/nccl/lib on LD_LIBRARY_PATH) or set ASGE_NCCL to the library's path",
        tried.join("; ")
    )
}

/// The path of the file `sym` came from.
fn file_of(sym: *mut c_void, fallback: &str) -> String {
    // SAFETY: dladdr reads the loader's tables for an address dlsym returned.
    unsafe {
        let mut info: libc::Dl_info = std::mem::zeroed();
        if libc::dladdr(sym, &mut info) != 0 && !info.dli_fname.is_null() {
            return CStr::from_ptr(info.dli_fname).to_string_lossy().into_owned();
        }
    }
    fallback.to_string()
}

fn load_once() -> Result<Nccl> {
    let (h, what) = open()?;
    let sym = |name: &CStr| -> Result<*mut c_void> {
        // SAFETY: a lookup in a handle dlopen returned.
        let p = unsafe { libc::dlsym(h, name.as_ptr()) };
        ensure!(!p.is_null(), "{what}: no {} (NCCL 2.18 or later is needed)", name.to_string_lossy());
        Ok(p)
    };
    macro_rules! bind {
        ($name:literal, $ty:ty) => {
            // SAFETY: the symbol is NCCL's function of that name, whose C signature the type spells.
            unsafe { std::mem::transmute::<*mut c_void, $ty>(sym($name)?) }
        };
    }
    let first = sym(c"ncclGetVersion")?;
    let mut n = Nccl {
        file: if crate::backend::cuda::standin::requested() { what.clone() } else { file_of(first, &what) },
        version: String::new(),
        get_version: bind!(c"ncclGetVersion", GetVersion),
        get_unique_id: bind!(c"ncclGetUniqueId", GetUniqueId),
        comm_init_rank: bind!(c"ncclCommInitRank", CommInitRank),
        all_reduce: bind!(c"ncclAllReduce", AllReduce),
        broadcast: bind!(c"ncclBroadcast", Broadcast),
        send: bind!(c"ncclSend", SendFn),
        recv: bind!(c"ncclRecv", RecvFn),
        group_start: bind!(c"ncclGroupStart", Group),
        group_end: bind!(c"ncclGroupEnd", Group),
        comm_get_async_error: bind!(c"ncclCommGetAsyncError", CommAsyncError),
        comm_abort: bind!(c"ncclCommAbort", CommCall),
        comm_destroy: bind!(c"ncclCommDestroy", CommCall),
        get_error_string: bind!(c"ncclGetErrorString", ErrorString),
        get_last_error: bind!(c"ncclGetLastError", LastError),
    };
    let mut v = 0;
    // SAFETY: one out-parameter.
    n.check(unsafe { (n.get_version)(&mut v) }, "ncclGetVersion", None)?;
    // NCCL_VERSION_CODE: major * 10000 + minor * 100 + patch since 2.9, major * 1000 + minor * 100 + patch before.
    n.version = if v >= 10000 {
        format!("{}.{}.{}", v / 10000, (v % 10000) / 100, v % 100)
    } else {
        format!("{}.{}.{}", v / 1000, (v % 1000) / 100, v % 100)
    };
    Ok(n)
}

impl Nccl {
    /// An error naming the call and what NCCL says, the communicator's last message included.
    fn check(&self, r: Res, call: &str, comm: Option<ncclComm_t>) -> Result<()> {
        if r == 0 {
            return Ok(());
        }
        // SAFETY: NCCL returns static strings (or null).
        let s = unsafe { (self.get_error_string)(r) };
        let text = if s.is_null() { "unknown".into() } else { unsafe { CStr::from_ptr(s) }.to_string_lossy() };
        // SAFETY: null or a communicator this process made; NCCL returns a string it owns.
        let last = unsafe { (self.get_last_error)(comm.unwrap_or(std::ptr::null_mut())) };
        let last =
            if last.is_null() { String::new() } else { unsafe { CStr::from_ptr(last) }.to_string_lossy().into_owned() };
        if last.is_empty() {
            bail!("NCCL: {call}: {text} (code {r})")
        }
        bail!("NCCL: {call}: {text} (code {r}): {last}")
    }

    /// A new unique id (rank 0 makes it and sends it to the others).
    pub fn unique_id(&self) -> Result<[u8; 128]> {
        let mut id = ncclUniqueId { internal: [0; 128] };
        // SAFETY: one out-parameter.
        self.check(unsafe { (self.get_unique_id)(&mut id) }, "ncclGetUniqueId", None)?;
        Ok(id.internal.map(|c| c as u8))
    }
}

/// A communicator: this process's rank among `world`. Used from one thread; aborted (not destroyed) when dropped
/// after an error, destroyed otherwise.
pub struct Comm {
    nccl: &'static Nccl,
    comm: ncclComm_t,
    pub rank: usize,
    pub world: usize,
    /// Set (before the call) once the communicator is aborted: NCCL frees it then, so no call may use it after.
    aborted: std::sync::atomic::AtomicBool,
}

// SAFETY: the communicator is used by one thread at a time (`&mut self` or the owner's lock); the watchdog's
// asynchronous-error query and abort are the calls NCCL allows from another thread.
unsafe impl Send for Comm {}
unsafe impl Sync for Comm {}

/// What a collective reduces.
#[derive(Clone, Copy, Debug)]
pub enum Reduce {
    Sum,
    Avg,
    Max,
    Min,
}

/// An element type NCCL reduces.
pub trait Element: Copy {
    const TYPE: ncclDataType_t;
}
impl Element for f32 {
    const TYPE: ncclDataType_t = ncclDataType_t::ncclFloat32;
}
impl Element for f64 {
    const TYPE: ncclDataType_t = ncclDataType_t::ncclFloat64;
}
impl Element for u64 {
    const TYPE: ncclDataType_t = ncclDataType_t::ncclUint64;
}
/// Bytes, for transfers of any buffer (fp16 activations among them).
impl Element for u8 {
    const TYPE: ncclDataType_t = ncclDataType_t::ncclUint8;
}

impl Comm {
    /// Joins the communicator `id` as `rank` of `world` (every rank calls this; it returns once all have).
    pub fn init(nccl: &'static Nccl, id: &[u8; 128], rank: usize, world: usize) -> Result<Comm> {
        let mut comm: ncclComm_t = std::ptr::null_mut();
        let id = ncclUniqueId { internal: id.map(|b| b as c_char) };
        // SAFETY: an out-parameter, the id by value, rank < world (checked by the caller).
        let r = unsafe { (nccl.comm_init_rank)(&mut comm, world as c_int, id, rank as c_int) };
        nccl.check(r, &format!("ncclCommInitRank (rank {rank} of {world})"), None)?;
        Ok(Comm { nccl, comm, rank, world, aborted: Default::default() })
    }

    /// Queues an in-place all-reduce of `len` values at `ptr` (device memory) on `stream`.
    ///
    /// # Safety
    /// `ptr` must be device memory of at least `len` values of `T`, not used by other work until the stream
    /// has run the collective.
    pub unsafe fn all_reduce_raw<T: Element>(&self, ptr: u64, len: usize, op: Reduce, stream: Stream) -> Result<()> {
        let op = match op {
            Reduce::Sum => ncclRedOp_t::ncclSum,
            Reduce::Avg => ncclRedOp_t::ncclAvg,
            Reduce::Max => ncclRedOp_t::ncclMax,
            Reduce::Min => ncclRedOp_t::ncclMin,
        };
        self.usable("ncclAllReduce")?;
        let p = ptr as *mut c_void;
        // SAFETY: the caller's contract; send and receive buffers are the same (in place), as NCCL allows.
        let r = unsafe { (self.nccl.all_reduce)(p, p, len, T::TYPE, op, self.comm, stream) };
        self.nccl.check(r, "ncclAllReduce", Some(self.comm))
    }

    /// Queues an in-place broadcast from `root` of `len` values at `ptr` on `stream`.
    ///
    /// # Safety
    /// As [`Comm::all_reduce_raw`].
    pub unsafe fn broadcast_raw<T: Element>(&self, ptr: u64, len: usize, root: usize, stream: Stream) -> Result<()> {
        self.usable("ncclBroadcast")?;
        let p = ptr as *mut c_void;
        // SAFETY: the caller's contract.
        let r = unsafe { (self.nccl.broadcast)(p, p, len, T::TYPE, root as c_int, self.comm, stream) };
        self.nccl.check(r, "ncclBroadcast", Some(self.comm))
    }

    /// Queues a send of `len` values at `ptr` to rank `peer` on `stream` (point to point: the peer queues the
    /// matching [`Comm::recv_raw`]; inside a [`Comm::group`] when the two ranks also receive from each other).
    ///
    /// # Safety
    /// As [`Comm::all_reduce_raw`].
    pub unsafe fn send_raw<T: Element>(&self, ptr: u64, len: usize, peer: usize, stream: Stream) -> Result<()> {
        self.usable("ncclSend")?;
        // SAFETY: the caller's contract.
        let r = unsafe { (self.nccl.send)(ptr as *const c_void, len, T::TYPE, peer as c_int, self.comm, stream) };
        self.nccl.check(r, "ncclSend", Some(self.comm))
    }

    /// Queues a receive of `len` values into `ptr` from rank `peer` on `stream` (see [`Comm::send_raw`]).
    ///
    /// # Safety
    /// As [`Comm::all_reduce_raw`].
    pub unsafe fn recv_raw<T: Element>(&self, ptr: u64, len: usize, peer: usize, stream: Stream) -> Result<()> {
        self.usable("ncclRecv")?;
        // SAFETY: the caller's contract.
        let r = unsafe { (self.nccl.recv)(ptr as *mut c_void, len, T::TYPE, peer as c_int, self.comm, stream) };
        self.nccl.check(r, "ncclRecv", Some(self.comm))
    }

    /// Runs `f` between `ncclGroupStart` and `ncclGroupEnd` (the collectives in it are issued together).
    pub fn group(&self, f: impl FnOnce() -> Result<()>) -> Result<()> {
        self.usable("ncclGroupStart")?;
        // SAFETY: no arguments.
        self.nccl.check(unsafe { (self.nccl.group_start)() }, "ncclGroupStart", Some(self.comm))?;
        let r = f();
        // SAFETY: closes the group just opened (also after an error inside it, as NCCL requires).
        let end = self.nccl.check(unsafe { (self.nccl.group_end)() }, "ncclGroupEnd", Some(self.comm));
        r.and(end)
    }

    /// The communicator's asynchronous error (a peer gone, a network failure), if any.
    pub fn async_error(&self) -> Result<()> {
        self.usable("ncclCommGetAsyncError")?;
        let mut e: Res = 0;
        // SAFETY: an out-parameter; NCCL allows this call from any thread.
        self.nccl.check(
            unsafe { (self.nccl.comm_get_async_error)(self.comm, &mut e) },
            "ncclCommGetAsyncError",
            None,
        )?;
        self.nccl.check(e, "a collective", Some(self.comm))
    }

    /// Aborts the communicator's pending work (from the watchdog); the communicator is unusable after.
    pub fn abort(&self) {
        if self.aborted.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        // SAFETY: NCCL allows an abort from another thread; the result is ignored (there is nothing left to do).
        let _ = unsafe { (self.nccl.comm_abort)(self.comm) };
    }

    /// An error once the communicator is aborted (by the watchdog, after a lost rank or a timeout).
    fn usable(&self, call: &str) -> Result<()> {
        if self.aborted.load(std::sync::atomic::Ordering::SeqCst) {
            bail!("NCCL: {call}: the communicator was aborted (a rank was lost or timed out; see the error above)");
        }
        Ok(())
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        // SAFETY: the communicator this value owns; destroy after an asynchronous error would block, so abort then.
        unsafe {
            if self.aborted.load(std::sync::atomic::Ordering::SeqCst) {
                // Freed by the abort.
            } else if self.async_error().is_err() {
                (self.nccl.comm_abort)(self.comm);
            } else {
                (self.nccl.comm_destroy)(self.comm);
            }
        }
    }
}

/// `asge info`'s line: which NCCL file and version was found, or why none.
pub fn describe() -> String {
    match load() {
        Ok(n) => format!("{} (NCCL {})", n.file, n.version),
        Err(e) => format!("none ({e:#})"),
    }
}
