//! Tests of tests/cuda.rs that need the CUDA driver stand-in itself: its launch log, a held stream, its exported
//! functions, its graph capture's rules. Ignored unless the stand-in runs them (ASGE_CUDA_STANDIN=1).

use super::*;

#[test]
#[ignore = "needs the CUDA stand-in (ASGE_CUDA_STANDIN=1): it reads the stand-in's launch log"]
fn standin_the_kernel_table_times_every_launch_of_a_step() {
    // `asge bench`'s kernel table: with kernel timing on, every kernel a training step launches is timed, by name
    // and in order, and none runs inside a step graph (whose kernels no event could time one by one). The
    // stand-in's own log of what it ran is the reference: a launch that bypassed the timing, or a replayed graph,
    // would show as a missing or extra row.
    for precision in PRECISIONS {
        let spec = model::resolve("vgg8", 3, 32, 10, &ModelOptions { width: 0.125, ..Default::default() }).unwrap();
        let layers = spec.layers.len();
        let params = Params::init(&spec, 5);
        let b = 2;
        let be = gpu().with_precision(precision);
        assert!(be.is_standin(), "this test reads the stand-in's launch log");
        let mut net = Net::new(be, spec, &params, AdamW::default(), b).unwrap();
        let x = randn(b * 3 * 32 * 32, 1.0, 77);
        let labels: Vec<u32> = (0..b as u32).collect();
        // Steps 1-4 make and replay the step graphs (two per step: the statistics' parity alternates).
        for t in 1..=4 {
            net.train_step_pipelined(&x, &labels, 1e-4, t, None).unwrap();
        }
        net.flush_stats().unwrap();
        assert!(net.backend().time_kernels(true).unwrap());
        let mark = cuda::standin::launches_logged().unwrap();
        net.train_step_pipelined(&x, &labels, 1e-4, 5, None).unwrap();
        net.flush_stats().unwrap();
        let times = net.backend().take_kernel_times().unwrap();
        // What ran on this backend's streams (the log is the process's: other tests launch on theirs meanwhile).
        let mine: Vec<u64> = net.backend().streams().iter().map(|s| s.cu_stream() as u64).collect();
        let ran: Vec<_> =
            cuda::standin::launches_since(mark).unwrap().into_iter().filter(|l| mine.contains(&l.stream)).collect();
        net.backend().time_kernels(false).unwrap();
        let p = precision.as_str();
        let timed: Vec<&str> = times.iter().map(|t| t.kernel).collect();
        let logged: Vec<&str> = ran.iter().map(|l| l.kernel.as_str()).collect();
        assert_eq!(timed, logged, "{p}: the kernels timed are not the kernels the step ran");
        for l in 1..=layers + 1 {
            assert!(times.iter().any(|t| t.layer == l), "{p}: no kernel timed at layer {l} ({layers} + the heads)");
        }
        assert!(times.iter().all(|t| t.us > 0.0 && t.bytes > 0.0), "{p}: a kernel without its time or bytes");
        let gemm_flop: f64 = times.iter().map(|t| t.flop).sum();
        let conv_flop = 4.0 * (net.spec.conv_macs() * b) as f64;
        assert_eq!(gemm_flop, conv_flop, "{p}: the GEMMs' FLOPs are not the step's conv FLOPs");
        // Timing off: the next steps replay their graphs again (no launch timed).
        net.train_step_pipelined(&x, &labels, 1e-4, 6, None).unwrap();
        net.flush_stats().unwrap();
        assert!(net.backend().take_kernel_times().unwrap().is_empty(), "{p}: timed with kernel timing off");
    }
}

#[test]
#[ignore = "needs the CUDA stand-in (ASGE_CUDA_STANDIN=1): it holds a stream"]
fn standin_a_steps_statistics_arrive_while_the_next_step_is_still_queued() {
    // The pipelined trainer queues step t + 1 before it reads step t's statistics. That is worth something only if
    // the read does not wait for step t + 1: here the compute stream is held (nothing queued on it runs) while step
    // 2 is queued, and step 1's statistics must still come back. A readback queued behind step 2 would wait forever.
    let be = gpu();
    assert!(be.is_standin(), "this test holds a stream, which only the stand-in can");
    let spec = model::resolve("vgg8", 1, 32, 10, &ModelOptions { width: 0.125, ..Default::default() }).unwrap();
    let params = Params::init(&spec, 5);
    let b = 8;
    let mut net = Net::new(be, spec, &params, AdamW::default(), b).unwrap();
    let batch = |t: u64| -> (Vec<f32>, Vec<u32>) {
        (randn(b * 32 * 32, 1.0, 900 + t).iter().map(|v| v.abs()).collect(), (0..b as u32).map(|i| i % 10).collect())
    };
    let (x1, l1) = batch(1);
    assert!(net.train_step_pipelined(&x1, &l1, 2e-4, 1, None).unwrap().is_none());
    net.backend().synchronize().unwrap();
    let compute = net.backend().streams()[0].clone();
    cuda::standin::hold_stream(&compute, true).unwrap();
    let (x2, l2) = batch(2);
    let got = std::thread::scope(|sc| {
        let h = sc.spawn(|| net.train_step_pipelined(&x2, &l2, 2e-4, 2, None));
        let t0 = std::time::Instant::now();
        while !h.is_finished() && t0.elapsed() < std::time::Duration::from_secs(60) {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let finished = h.is_finished();
        let pending = cuda::standin::pending(&compute).unwrap();
        cuda::standin::hold_stream(&compute, false).unwrap();
        let r = h.join().unwrap();
        assert!(finished, "step 1's statistics waited for step 2 (still held on the compute stream)");
        assert!(pending > 0, "step 2 was not queued behind the hold");
        r
    });
    let s1 = got.unwrap().expect("step 1's statistics");
    assert_eq!(s1.step, 1);
    assert!(s1.layer_loss.iter().all(|l| l.is_finite() && *l > 0.0), "{s1:?}");
    let s2 = net.flush_stats().unwrap().unwrap();
    assert_eq!(s2.step, 2);
}

#[test]
#[ignore = "needs the CUDA stand-in (ASGE_CUDA_STANDIN=1): it holds a stream"]
fn standin_an_op_on_another_lane_waits_for_the_step_graph() {
    // A replayed step graph runs on lane 0 only, and cudarc's per-buffer events know nothing of what it writes
    // (tracking is off while capturing), so an eager op on another lane is ordered after the graph only by the
    // wait each side stream is given at its launch (graph.rs, meet_after_graph). Here lane 0 is held while a
    // replay is queued, without waiting for its statistics; an op of layer 1 (lane 1) that reads the stepped
    // weights must then wait for the release (without that wait it runs at once, on the weights from before the
    // step), and compute from the stepped ones.
    let be = CudaBackend::with_lanes(0, 3).unwrap();
    assert!(be.is_standin(), "this test holds a stream, which only the stand-in can");
    let spec = model::resolve("vgg8", 1, 16, 10, &ModelOptions { width: 0.125, ..Default::default() }).unwrap();
    let params = Params::init(&spec, 3);
    let b = 8;
    let mut net = Net::new(be, spec.clone(), &params, AdamW::default(), b).unwrap();
    let mut eager =
        Net::new(CudaBackend::with_lanes(0, 3).unwrap().without_step_graphs(), spec, &params, AdamW::default(), b)
            .unwrap();
    let batch = |t: u64| -> (Vec<f32>, Vec<u32>) {
        (randn(b * 16 * 16, 1.0, 500 + t).iter().map(|v| v.abs()).collect(), (0..b as u32).map(|i| i % 10).collect())
    };
    // Graph keys are (batch, activation parity = step % 2, statistics set, which alternates per call). Calls 1 and 2
    // warm two keys, 3 and 4 capture them; call 5 repeats step 4 (a third key, eager), so that call 6, step 4
    // again, replays the second graph with AdamW's scalars unchanged: no per-step parameter is copied (a copy on
    // lane 0, behind the hold, would order lane 1 after lane 0 through the shared parameter buffer and hide the
    // missing wait). Without dropout there are no keys to copy either.
    let steps = [1, 2, 3, 4, 4];
    for (k, &t) in steps.iter().enumerate() {
        let (x, l) = batch(k as u64);
        net.train_step(&x, &l, 1e-3, t, None).unwrap();
        eager.train_step(&x, &l, 1e-3, t, None).unwrap();
    }
    net.backend().synchronize().unwrap();
    let (x, l) = batch(9);
    eager.train_step(&x, &l, 1e-3, 4, None).unwrap();
    // Layer 1's op below writes buffers of its own, made now: made behind the hold, they would order it after
    // lane 0 by themselves.
    let n = net.layers[0].conv_w.len;
    let zeros = |be: &CudaBackend| {
        let bufs = (be.zeros(n).unwrap(), be.zeros(n).unwrap(), be.zeros(n).unwrap());
        be.synchronize().unwrap();
        bufs
    };
    let (mut p, mut m, mut v) = zeros(net.backend());
    let lane0 = net.backend().streams()[0].clone();
    cuda::standin::hold_stream(&lane0, true).unwrap();
    assert!(net.train_step_pipelined(&x, &l, 1e-3, 4, None).unwrap().is_none());
    assert_eq!(net.backend().step_graph_counts(), (2, 1), "the sixth call was not a replay");
    // AdamW as the op of layer 1, with layer 0's conv weights, which the held graph writes, as its gradient; the
    // same op on the eager net gives the values to expect.
    let eager_be = eager.backend();
    let want = {
        let (mut p, mut m, mut v) = zeros(eager_be);
        let grad = &eager.layers[0].conv_w.value;
        asge::ops::adamw::run(
            eager_be,
            asge::ops::adamw::Args { layer: 1, len: n, p: &mut p, grad, m: &mut m, v: &mut v, copy: None },
        )
        .unwrap();
        eager_be.read(&p, n).unwrap()
    };
    let be = net.backend();
    let lane1 = be.streams()[1].clone();
    let grad = &net.layers[0].conv_w.value;
    std::thread::scope(|sc| {
        let h = sc.spawn(|| {
            asge::ops::adamw::run(
                be,
                asge::ops::adamw::Args { layer: 1, len: n, p: &mut p, grad, m: &mut m, v: &mut v, copy: None },
            )
            .unwrap();
            lane1.synchronize().unwrap();
        });
        // Two seconds is ~1000x what the unordered op takes; the ordered one cannot finish before the release.
        std::thread::sleep(std::time::Duration::from_secs(2));
        let early = h.is_finished();
        cuda::standin::hold_stream(&lane0, false).unwrap();
        h.join().unwrap();
        assert!(!early, "an op on lane 1 finished while the step graph it must follow was still held on lane 0");
    });
    assert_eq!(be.read(&p, n).unwrap(), want, "layer 1's op on the weights after the replayed step");
    let s6 = net.flush_stats().unwrap().unwrap();
    assert_eq!(s6.step, 4);
}

#[test]
#[ignore = "needs the CUDA stand-in (ASGE_CUDA_STANDIN=1): it checks the stand-in's exports"]
fn standin_exports_every_driver_function_cudarcs_safe_api_can_call() {
    // cudarc resolves each driver function on its first call and panics when the library lacks it, so the
    // stand-in must export every function the safe API (driver/result.rs and driver/safe/) can call, whether or
    // not the engine reaches it today. The list comes from the cudarc sources cargo built this test from.
    let be = gpu();
    assert!(be.is_standin(), "this test checks the stand-in");
    let home = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cargo"));
    let cudarc = std::fs::read_dir(home.join("registry/src"))
        .expect("cargo's registry sources")
        .filter_map(|e| e.ok())
        .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().filter_map(|e| e.ok()))
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy() == "cudarc-0.19.10"))
        .expect("cudarc 0.19.10's sources in cargo's registry");
    let driver = cudarc.join("src/driver");
    let mut files = vec![driver.join("result.rs")];
    files.extend(std::fs::read_dir(driver.join("safe")).unwrap().map(|e| e.unwrap().path()));
    let mut names = std::collections::BTreeSet::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for part in text.split("sys::cu").skip(1) {
            let name: String = part.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if part[name.len()..].starts_with('(') && name.chars().next().is_some_and(|c| c.is_ascii_uppercase()) {
                names.insert(format!("cu{name}"));
            }
        }
    }
    assert!(names.len() > 80, "only {} driver functions found in cudarc's safe API", names.len());
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| {
            let c = std::ffi::CString::new(n.as_str()).unwrap();
            // SAFETY: a symbol lookup in the process's global scope, where the stand-in is loaded.
            unsafe { libc::dlsym(libc::RTLD_DEFAULT, c.as_ptr()) }.is_null()
        })
        .collect();
    assert!(missing.is_empty(), "the stand-in does not export {missing:?}");
    println!("the stand-in exports all {} driver functions cudarc's safe API calls", names.len());
}

/// For the stand-in's capture tests: a context with cudarc's per-buffer events off (a capture cannot take them;
/// the tests order their streams themselves) and `dg_per_cell_f32`, which computes `out[i] = in[i] / div[i % pp]`.
fn capture_test_kernel() -> (std::sync::Arc<cudarc::driver::CudaContext>, cudarc::driver::CudaFunction) {
    assert!(gpu().is_standin(), "this test checks the stand-in's model of capture");
    let ctx = cudarc::driver::CudaContext::new(0).unwrap();
    // SAFETY: every test that uses this context orders its streams itself (one stream, or explicit events).
    unsafe { ctx.disable_event_tracking() };
    let (module, src, _) = nvrtc::KERNELS.iter().find(|(m, _, _)| *m == "conv_goodness_wgrad").unwrap();
    let m = ctx.load_module(nvrtc::compile(module, src, "sm_90").unwrap()).unwrap();
    let f = m.load_function("dg_per_cell_f32").unwrap();
    (ctx, f)
}

#[test]
#[ignore = "needs the CUDA stand-in (ASGE_CUDA_STANDIN=1): it checks the stand-in's graph capture"]
fn standin_graph_capture_replays_and_enforces_captures_rules() {
    // What the step graph relies on, and the rules a capture breaks: a capture records instead of running;
    // replay runs the captured kernels with their frozen arguments over the buffers' current contents; a
    // synchronisation, an allocation or a copy from pageable memory while capturing fails and invalidates the
    // capture; the legacy default stream cannot be captured.
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    use cudarc::driver::{LaunchConfig, PushKernelArg};
    let (ctx, f) = capture_test_kernel();
    let s = ctx.new_stream().unwrap();
    let n = 64i32;
    let mut dg = s.clone_htod(&(0..n).map(|i| i as f32).collect::<Vec<_>>()).unwrap();
    let div = s.clone_htod(&[2.0f32, 4.0]).unwrap();
    let mut q = s.alloc_zeros::<f32>(n as usize).unwrap();
    let pp = 2i32;
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    s.synchronize().unwrap();
    let mode = CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
    s.begin_capture(mode).unwrap();
    let mut l = s.launch_builder(&f);
    l.arg(&dg).arg(&div).arg(&mut q).arg(&n).arg(&pp);
    unsafe { l.launch(cfg) }.unwrap();
    let graph = s.end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH).unwrap();
    let graph = graph.expect("a graph");
    assert!(s.clone_dtoh(&q).unwrap().iter().all(|&v| v == 0.0), "the capture ran the kernel");
    graph.launch().unwrap();
    let want = |scale: f32| (0..n).map(|i| scale * i as f32 / if i % 2 == 0 { 2.0 } else { 4.0 }).collect::<Vec<_>>();
    assert_eq!(s.clone_dtoh(&q).unwrap(), want(1.0));
    // New contents, same buffers: the replay reads them.
    s.memcpy_htod(&(0..n).map(|i| 3.0 * i as f32).collect::<Vec<_>>(), &mut dg).unwrap();
    graph.launch().unwrap();
    assert_eq!(s.clone_dtoh(&q).unwrap(), want(3.0));

    // Each of capture's rules, broken once: the call fails and the capture is invalidated.
    for rule in 0..3 {
        s.begin_capture(mode).unwrap();
        let (what, r) = match rule {
            0 => ("a synchronisation", s.synchronize()),
            1 => ("an allocation", s.alloc_zeros::<f32>(16).map(|_| ())),
            _ => ("a copy from pageable memory", s.memcpy_htod(&[1.0f32; 4], &mut q.slice_mut(0..4))),
        };
        let e = r.expect_err(what);
        assert!(format!("{e:?}").contains("STREAM_CAPTURE_UNSUPPORTED"), "{what}: {e:?}");
        let end = s.end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
        let e = end.err().unwrap_or_else(|| panic!("{what}: the capture survived"));
        assert!(format!("{e:?}").contains("STREAM_CAPTURE_INVALIDATED"), "{what}: {e:?}");
        println!("{what} while capturing: refused, capture invalidated");
    }
    let legacy = ctx.default_stream().begin_capture(mode).expect_err("the legacy default stream was captured");
    assert!(format!("{legacy:?}").contains("STREAM_CAPTURE_UNSUPPORTED"), "{legacy:?}");
    s.synchronize().unwrap();
}

#[test]
#[ignore = "needs the CUDA stand-in (ASGE_CUDA_STANDIN=1): it checks the stand-in's graph capture"]
fn standin_a_capture_forks_and_joins_streams_by_events() {
    // What a step captured over several lanes relies on (src/backend/cuda/graph.rs), and the rules it must keep:
    // a stream that waits on an event recorded in a capture joins it; the graph orders a kernel after what its
    // stream waited on; the capture ends only on its origin, joined by every member; a capturing stream may not
    // wait on an event recorded outside it; an event recorded in a capture is not a host-side event.
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    use cudarc::driver::{CudaGraph, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
    use std::sync::Arc;
    // The second kernel reads what the first wrote.
    let (ctx, f) = capture_test_kernel();
    let st: Vec<Arc<CudaStream>> = (0..3).map(|_| ctx.new_stream().unwrap()).collect();
    let ev: Vec<_> = (0..3).map(|_| ctx.new_event(None).unwrap()).collect();
    let n = 64i32;
    let x = st[0].clone_htod(&(0..n).map(|i| i as f32).collect::<Vec<_>>()).unwrap();
    let div = st[0].clone_htod(&[2.0f32, 4.0]).unwrap();
    let mut q = st[0].alloc_zeros::<f32>(n as usize).unwrap();
    let mut r = st[0].alloc_zeros::<f32>(n as usize).unwrap();
    st[0].synchronize().unwrap();
    let pp = 2i32;
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let launch = |s: &Arc<CudaStream>, a: &CudaSlice<f32>, out: &mut CudaSlice<f32>| {
        let mut l = s.launch_builder(&f);
        l.arg(a).arg(&div).arg(out).arg(&n).arg(&pp);
        unsafe { l.launch(cfg) }.unwrap();
    };
    let mode = CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
    let end =
        |s: &Arc<CudaStream>| s.end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
    let want: Vec<f32> = (0..n).map(|i| i as f32 / if i % 2 == 0 { 4.0 } else { 16.0 }).collect();
    // Replays a graph 16 times from zeroed q and r; how many gave the right r.
    let replays = |g: &CudaGraph, q: &mut CudaSlice<f32>, r: &mut CudaSlice<f32>| -> usize {
        (0..16)
            .filter(|_| {
                st[0].memset_zeros(q).unwrap();
                st[0].memset_zeros(r).unwrap();
                g.launch().unwrap();
                st[0].clone_dtoh(r).unwrap() == want
            })
            .count()
    };
    // A fork to two streams, the second after the first, joined back: q on stream 1, then r on stream 2.
    let capture = |hand_off: bool, q: &mut CudaSlice<f32>, r: &mut CudaSlice<f32>| -> CudaGraph {
        st[0].memset_zeros(r).unwrap();
        st[0].synchronize().unwrap();
        st[0].begin_capture(mode).unwrap();
        ev[0].record(&st[0]).unwrap();
        st[1].wait(&ev[0]).unwrap();
        launch(&st[1], &x, q);
        ev[1].record(&st[1]).unwrap();
        st[2].wait(if hand_off { &ev[1] } else { &ev[0] }).unwrap();
        launch(&st[2], q, r);
        ev[2].record(&st[2]).unwrap();
        st[0].wait(&ev[1]).unwrap();
        st[0].wait(&ev[2]).unwrap();
        let g = end(&st[0]).unwrap().expect("a graph");
        assert!(st[0].clone_dtoh(r).unwrap().iter().all(|&v| v == 0.0), "the capture ran a kernel");
        g
    };
    let g = capture(true, &mut q, &mut r);
    assert_eq!(replays(&g, &mut q, &mut r), 16, "a replay with the hand-off gave a wrong result");
    // Planted: stream 2 waits on the fork only. Its kernel may now run before stream 1's, and the stand-in's replay
    // order (random among what the dependencies allow) must show it.
    let g = capture(false, &mut q, &mut r);
    let right = replays(&g, &mut q, &mut r);
    println!("without the hand-off, {right} of 16 replays were right");
    assert!(right < 16, "every replay without the hand-off was right: the replay order hides a missing dependency");

    // A member not joined back: the capture fails, and ends for both streams.
    st[0].begin_capture(mode).unwrap();
    ev[0].record(&st[0]).unwrap();
    st[1].wait(&ev[0]).unwrap();
    launch(&st[1], &x, &mut q);
    let e = format!(
        "{:?}",
        st[1].end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH).err()
    );
    assert!(e.contains("STREAM_CAPTURE_UNMATCHED"), "a member ended the capture: {e}");
    let e = format!("{:?}", end(&st[0]).err());
    assert!(e.contains("STREAM_CAPTURE_UNJOINED"), "an unjoined member: {e}");
    st[1].synchronize().expect("stream 1 still capturing after its capture failed");
    // An event from outside the capture: refused, and the capture is invalidated.
    ev[1].record(&st[1]).unwrap();
    st[0].begin_capture(mode).unwrap();
    let e = format!("{:?}", st[0].wait(&ev[1]).err());
    assert!(e.contains("STREAM_CAPTURE_ISOLATION"), "a wait across the capture's boundary: {e}");
    ev[2].record(&st[0]).unwrap();
    let e = format!("{:?}", end(&st[0]).err());
    assert!(e.contains("STREAM_CAPTURE_INVALIDATED"), "{e}");
    let e = format!("{:?}", ev[2].synchronize().err());
    assert!(e.contains("CAPTURED_EVENT"), "a host wait on an event last recorded in a capture: {e}");
    for s in &st {
        s.synchronize().unwrap();
    }
    println!("fork, join and hand-off captured; unmatched end, unjoined member, isolation, captured event refused");
}
