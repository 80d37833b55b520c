//! `--trace FILE`: a Chrome trace (JSON; opens in Perfetto or chrome://tracing) of what the loader and every
//! layer did per batch. Off by default; when on, every span costs one clock read and one short lock.

use serde::Serialize;
use std::sync::Mutex;
use std::time::Instant;

#[derive(Serialize)]
struct Event {
    name: &'static str,
    cat: &'static str,
    ph: &'static str,
    ts: f64,
    dur: f64,
    pid: u32,
    tid: u32,
    args: serde_json::Value,
}

struct Tracer {
    t0: Instant,
    events: Vec<Event>,
    path: std::path::PathBuf,
    /// Layers of the model, for the track names (set by the first flush).
    layers: usize,
}

static TRACER: Mutex<Option<Tracer>> = Mutex::new(None);

/// At most this many events are kept (about 100 MB of JSON); later spans are dropped.
const MAX_EVENTS: usize = 1_000_000;

/// Track ids: 0 is the loader, 1 the fusion heads, `10 + l` layer `l`.
pub const LOADER: u32 = 0;
pub const HEADS: u32 = 1;
pub fn layer(l: usize) -> u32 {
    10 + l as u32
}

/// Turns tracing on; [`flush`] writes to `path`.
pub fn enable(path: &std::path::Path) {
    *TRACER.lock().unwrap() =
        Some(Tracer { t0: Instant::now(), events: Vec::new(), path: path.to_path_buf(), layers: 0 });
}

/// A kernel timed on the device: its op, the lane (stream) it ran on, start and duration in microseconds on
/// the device's own clock.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceSpan {
    pub name: &'static str,
    pub lane: usize,
    pub start_us: f64,
    pub dur_us: f64,
}

/// True while tracing is on (backends use it to decide whether to time their kernels).
pub fn is_on() -> bool {
    TRACER.lock().unwrap().is_some()
}

/// Adds kernels timed on a device (CUDA events): one track per lane (stream), on their own clock.
pub fn add_device_spans(spans: &[DeviceSpan]) {
    if let Some(t) = TRACER.lock().unwrap().as_mut() {
        for s in spans {
            if t.events.len() >= MAX_EVENTS {
                break;
            }
            t.events.push(Event {
                name: s.name,
                cat: "device",
                ph: "X",
                ts: s.start_us,
                dur: s.dur_us,
                pid: 2,
                tid: s.lane as u32,
                args: serde_json::json!({}),
            });
        }
    }
}

/// A span that ends when dropped.
pub struct Span {
    start: Option<Instant>,
    name: &'static str,
    tid: u32,
    step: u64,
}

/// Starts a span on track `tid` (nothing is recorded unless tracing is on).
pub fn span(name: &'static str, tid: u32, step: u64) -> Span {
    let on = TRACER.lock().unwrap().is_some();
    Span { start: on.then(Instant::now), name, tid, step }
}

impl Drop for Span {
    fn drop(&mut self) {
        let Some(start) = self.start else { return };
        let end = Instant::now();
        if let Some(t) = TRACER.lock().unwrap().as_mut() {
            if t.events.len() < MAX_EVENTS {
                t.events.push(Event {
                    name: self.name,
                    cat: if self.tid == LOADER { "loader" } else { "compute" },
                    ph: "X",
                    ts: start.duration_since(t.t0).as_secs_f64() * 1e6,
                    dur: end.duration_since(start).as_secs_f64() * 1e6,
                    pid: 1,
                    tid: self.tid,
                    args: serde_json::json!({ "batch": self.step }),
                });
            }
        }
    }
}

/// Writes the trace so far (atomically) to the file given to [`enable`], with track names; a no-op when off. A
/// character device or FIFO gets the trace once, at [`finish`], so that a pipe's reader sees one JSON document
/// and a run never waits for a reader between epochs.
pub fn flush(layers: usize) -> anyhow::Result<()> {
    write(Some(layers), false)
}

/// Writes the whole trace to a character device or FIFO at the end of a run (a regular file has it from the last
/// [`flush`]); a no-op when off.
pub fn finish() -> anyhow::Result<()> {
    write(None, true)
}

fn write(layers: Option<usize>, last: bool) -> anyhow::Result<()> {
    let mut guard = TRACER.lock().unwrap();
    let Some(t) = guard.as_mut() else { return Ok(()) };
    if let Some(n) = layers {
        t.layers = n;
    }
    let out = output(&t.path);
    // Regular files at every flush, devices and FIFOs only at the end.
    if (out.check()? == crate::files::OutputTarget::Stream) != last {
        return Ok(());
    }
    let layers = t.layers;
    let mut names = vec![(LOADER, "loader".to_string()), (HEADS, "fusion heads".to_string())];
    names.extend((0..layers).map(|l| (layer(l), format!("layer {}", l + 1))));
    let mut events: Vec<serde_json::Value> = names
        .into_iter()
        .map(
            |(tid, n)| serde_json::json!({"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": n}}),
        )
        .collect();
    events.extend(t.events.iter().map(|e| serde_json::to_value(e).unwrap()));
    // The producer first, so that a later run recognises its own trace from the file's first bytes.
    let body = format!("{TRACE_HEAD}\"displayTimeUnit\":\"ms\",\"traceEvents\":{}}}", serde_json::to_string(&events)?);
    out.write(body.as_bytes())
}

/// How an asge trace begins (Chrome's trace format keeps `otherData` as the trace's metadata).
const TRACE_HEAD: &str = "{\"otherData\":{\"producer\":\"asge\"},";

/// True for a file that begins as an asge trace.
fn is_trace(p: &std::path::Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; TRACE_HEAD.len()];
    std::fs::File::open(p).and_then(|mut f| f.read_exact(&mut head)).is_ok() && head == TRACE_HEAD.as_bytes()
}

/// `--trace FILE` as the output guard sees it: only an earlier asge trace is replaced; a device or FIFO is
/// written into.
fn output(path: &std::path::Path) -> crate::files::Output<'_> {
    crate::files::Output { path, flag: "--trace", kind: "an asge trace", ours: &is_trace }
}

/// Checks that the trace may be written where [`enable`] was told (before a run does any work); a no-op when off.
pub fn check() -> anyhow::Result<()> {
    let guard = TRACER.lock().unwrap();
    match guard.as_ref() {
        Some(t) => output(&t.path).check().map(|_| ()),
        None => Ok(()),
    }
}

/// The trace's path, when tracing is on.
pub fn path() -> Option<std::path::PathBuf> {
    TRACER.lock().unwrap().as_ref().map(|t| t.path.clone())
}
