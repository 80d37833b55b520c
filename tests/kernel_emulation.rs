//! The CUDA kernels run on the CPU: kernels/*.cu compiled by the host C++ compiler through tests/emu/cuda_emu.h
//! (fibers for threads, barriers for __syncthreads and the warp collectives, _Float16 for fp16, the documented
//! mma.sync fragment layout and ldmatrix), launched over the grids the CUDA backend computes (`cuda::geometry`)
//! with the tables it builds, and checked against the CPU reference in both precisions, with the GPU parity
//! tests' tolerances (tests/cuda.rs). Every fp16 conv kernel variant runs on every case, whichever the backend
//! would pick for that shape.
//!
//! This runs in CI, where there is no GPU: it proves the kernels' indexing, bounds, tiling, im2col gathers,
//! epilogues, fp16 rounding points, dL/dz scaling and deterministic reductions before a GPU ever runs them.
//! It cannot prove what only hardware shows (the mma fragment layout as the tensor cores read it, memory-model
//! races between blocks, speed): the GPU parity tests do that.
#![cfg(feature = "cuda")]

mod common;

use asge::backend::cpu::CpuBackend;
use asge::backend::cuda::geometry;
use asge::backend::prelude::*;
use asge::backend::{AdamWScalars, AdamWStep, ConvShape, Dropout, Precision};
use asge::model::{GoodnessReduce, PatchGrid, PoolKind};
use common::{close, conv_cases, conv_inputs, conv_output, heads_case, output_cases, randn, HeadsCase};
use std::path::PathBuf;
use std::sync::OnceLock;

/// The host build of the kernels, compiled once per test run.
fn lib() -> &'static libloading::Library {
    static LIB: OnceLock<libloading::Library> = OnceLock::new();
    LIB.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let out =
            PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("asge-kernels-emu-{}.so", std::process::id()));
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let status = std::process::Command::new(&cxx)
            .args(["-std=c++17", "-O2", "-shared", "-fPIC", "-fno-strict-aliasing", "-w"])
            .arg(format!("-I{}", env!("OUT_DIR")))
            .arg("-o")
            .arg(&out)
            .arg(root.join("tests/emu/launch.cpp"))
            .status()
            .unwrap_or_else(|e| panic!("cannot run the C++ compiler `{cxx}` (set CXX): {e}"));
        assert!(status.success(), "the host build of kernels/*.cu failed (see the compiler output above)");
        // SAFETY: the library is the one just built from tests/emu/launch.cpp; it has no initialisers that race.
        let lib = unsafe { libloading::Library::new(&out) }.expect("load the host build of the kernels");
        // Loaded (mapped) stays loaded; the file need not pile up in the target folder.
        let _ = std::fs::remove_file(&out);
        lib
    })
}

type Grid = (u32, u32, u32);

/// The emulator is single-threaded (one scheduler, shared statics as `__shared__`): one launch at a time.
static EMU: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Calls `emu_<name>` with the grid and the kernel's arguments (and, after `smem`, the launch's dynamic shared
/// memory in bytes). The signature must match tests/emu/launch.cpp.
macro_rules! launch {
    ($name:expr, $grid:expr, fn($($t:ty),* $(,)?), $($arg:expr),* $(,)?) => {
        launch!($name, $grid, smem 0, fn($($t),*), $($arg),*)
    };
    ($name:expr, $grid:expr, smem $smem:expr, fn($($t:ty),* $(,)?), $($arg:expr),* $(,)?) => {{
        let grid: Grid = $grid;
        let name: &str = $name;
        let smem: u32 = $smem;
        let _one_at_a_time = EMU.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the symbols are the emulation's setter of the next launch's shared memory and the C wrapper of
        // that kernel with exactly these argument types; every pointer is to a live buffer at least as long as the
        // kernel indexes (the same shapes the GPU backend checks).
        unsafe {
            let set: libloading::Symbol<unsafe extern "C" fn(u32)> =
                lib().get(b"set_dynamic_smem\0").expect("set_dynamic_smem");
            set(smem);
            let f: libloading::Symbol<unsafe extern "C" fn(u32, u32, u32, $($t),*)> =
                lib().get(format!("emu_{name}\0").as_bytes()).expect(name);
            f(grid.0, grid.1, grid.2, $($arg),*)
        }
    }};
}

fn to_f16(v: &[f32]) -> Vec<u16> {
    v.iter().map(|&x| half::f16::from_f32(x).to_bits()).collect()
}

fn from_f16(v: &[u16]) -> Vec<f32> {
    v.iter().map(|&h| half::f16::from_bits(h).to_f32()).collect()
}

const NAN16: u16 = 0x7e00;

/// The conv forward, patch goodness and weight gradient of the CUDA backend, in `p`, on the host: (y, g, dW, dB).
#[allow(clippy::too_many_arguments)]
fn gpu_conv(
    p: Precision,
    (fwd_f16, wgrad_f16): (geometry::FwdKernel, geometry::WgradKernel),
    s: &ConvShape,
    grid: &PatchGrid,
    reduce: GoodnessReduce,
    x: &[f32],
    w: &[f32],
    b: &[f32],
    dg: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let (bb, ci, co, h, ww, pp) =
        (s.batch as i32, s.c_in as i32, s.c_out as i32, s.h as i32, s.w as i32, grid.p as i32);
    let mean = (reduce == GoodnessReduce::Mean) as i32;
    let g_len = s.batch * s.c_out * grid.cells();
    let mut g = vec![f32::NAN; g_len];
    let split = match p {
        Precision::F32 => geometry::wgrad(s, p),
        Precision::F16 => geometry::wgrad_split(s, &wgrad_f16),
    };
    let mk = s.w_len();
    let cp = geometry::padded_channels(s.c_in);
    let k_part = if p == Precision::F16 { 9 * cp } else { 9 * s.c_in };
    let db_slices = if p == Precision::F16 { geometry::dz_grid(s).0 as usize } else { split.slices };
    let mut part = vec![f32::NAN; split.slices * s.c_out * k_part];
    let mut part_db = vec![f32::NAN; db_slices * s.c_out];
    let (mut dw, mut db) = (vec![f32::NAN; mk], vec![f32::NAN; s.c_out]);
    let chunk = split.chunk as i32;
    // The backend's tables and its per-cell dL/dg / |bin| (dg_per_cell_f32), as both precisions use them.
    let taps = geometry::tap_table(s.c_in, s.h, s.w).unwrap();
    let (cells, div) = geometry::cell_table(grid, reduce).unwrap();
    let mut q = vec![f32::NAN; g_len];
    launch!(
        "dg_per_cell_f32",
        geometry::grid1(g_len),
        fn(*const f32, *const f32, *mut f32, i32, i32),
        dg.as_ptr(),
        div.as_ptr(),
        q.as_mut_ptr(),
        g_len as i32,
        grid.cells() as i32
    );
    let y = match p {
        Precision::F32 => {
            let mut y = vec![f32::NAN; s.y_len()];
            launch!(
                "conv_goodness_fwd_f32",
                geometry::conv_fwd(s, p),
                fn(*const f32, *const f32, *const f32, *const i32, *mut f32, i32, i32, i32, i32, i32),
                x.as_ptr(),
                w.as_ptr(),
                b.as_ptr(),
                taps.as_ptr(),
                y.as_mut_ptr(),
                bb,
                ci,
                co,
                h,
                ww
            );
            launch!(
                "patch_goodness_f32",
                geometry::grid1(g_len),
                fn(*const f32, *mut f32, i32, i32, i32, i32, i32, i32),
                y.as_ptr(),
                g.as_mut_ptr(),
                bb,
                co,
                h,
                ww,
                pp,
                mean
            );
            launch!(
                "conv_goodness_wgrad_f32",
                split.grid,
                fn(
                    *const f32,
                    *const f32,
                    *const f32,
                    *const i32,
                    *const i32,
                    *mut f32,
                    *mut f32,
                    i32,
                    i32,
                    i32,
                    i32,
                    i32,
                    i32,
                    i32,
                ),
                x.as_ptr(),
                y.as_ptr(),
                q.as_ptr(),
                taps.as_ptr(),
                cells.as_ptr(),
                part.as_mut_ptr(),
                part_db.as_mut_ptr(),
                bb,
                ci,
                co,
                h,
                ww,
                pp,
                chunk
            );
            // Only the first K-tile's blocks write the bias partials; the reduce reads all of them.
            launch!(
                "wgrad_reduce_f32",
                geometry::grid1(mk),
                fn(*const f32, *const f32, *mut f32, *mut f32, i32, i32, i32),
                part.as_ptr(),
                part_db.as_ptr(),
                dw.as_mut_ptr(),
                db.as_mut_ptr(),
                mk as i32,
                co,
                split.slices as i32
            );
            y
        }
        Precision::F16 => {
            let (x16, w16) = (to_f16(x), to_f16(w));
            let mut y16 = vec![NAN16; s.y_len()];
            // The channels-last copies the backend makes, then either fp16 forward kernel (the backend picks one
            // by shape) over its own grid with its dynamic shared memory.
            let (mut xn, mut wn) =
                (vec![NAN16; s.batch * s.h * s.w * cp], vec![NAN16; geometry::padded_weights_len(s.c_out, cp)]);
            launch!(
                "nhwc_pad_f16",
                geometry::grid1(xn.len() / 8),
                fn(*const u16, *mut u16, i32, i32, i32, i32, i32),
                x16.as_ptr(),
                xn.as_mut_ptr(),
                bb,
                ci,
                h,
                ww,
                cp as i32
            );
            launch!(
                "krsc_pad_f16",
                geometry::grid1(wn.len()),
                fn(*const u16, *mut u16, i32, i32, i32),
                w16.as_ptr(),
                wn.as_mut_ptr(),
                co,
                ci,
                cp as i32
            );
            let ntaps = geometry::nhwc_tap_table(cp, s.h, s.w).unwrap();
            // The goodness partials of the kernel's tiles, summed per cell by goodness_tiles_f32 (unwritten
            // partials stay NaN: reading one shows).
            let (nb, gpart_len) = geometry::goodness_partials(s, grid, &fwd_f16);
            let (nb, mut gpart) = (nb as i32, vec![f32::NAN; gpart_len]);
            let (gx, gy, _) = geometry::conv_fwd_grid(s, fwd_f16.tile_m, fwd_f16.tile_n);
            if fwd_f16 == geometry::CONV_FWD_F16_SPLIT {
                // Split over K into 3 runs (on the 2-step layers one of them is empty: zero partials), then the
                // ordered sum with the bias, ReLU and the goodness epilogue, over the same tiles.
                let n = s.batch * s.h * s.w;
                let mut part = vec![f32::NAN; 3 * s.c_out * n];
                launch!(
                    "conv_fwd_nhwc_f16_sk",
                    (gx, gy, 3),
                    smem fwd_f16.smem,
                    fn(*const u16, *const u16, *const i32, *mut f32, i32, i32, i32, i32, i32),
                    xn.as_ptr(),
                    wn.as_ptr(),
                    ntaps.as_ptr(),
                    part.as_mut_ptr(),
                    bb,
                    cp as i32,
                    co,
                    h,
                    ww
                );
                launch!(
                    "conv_fwd_splitk_f16",
                    (gx, gy, 1),
                    fn(*const f32, *const f32, *mut u16, *mut f32, i32, i32, i32, i32, i32, i32, i32),
                    part.as_ptr(),
                    b.as_ptr(),
                    y16.as_mut_ptr(),
                    gpart.as_mut_ptr(),
                    bb,
                    co,
                    h,
                    ww,
                    3,
                    pp,
                    nb
                );
            } else {
                launch!(
                    fwd_f16.name,
                    (gx, gy, 1),
                    smem fwd_f16.smem,
                    fn(*const u16, *const u16, *const f32, *const i32, *mut u16, *mut f32, i32, i32, i32, i32, i32, i32, i32),
                    xn.as_ptr(),
                    wn.as_ptr(),
                    b.as_ptr(),
                    ntaps.as_ptr(),
                    y16.as_mut_ptr(),
                    gpart.as_mut_ptr(),
                    bb,
                    cp as i32,
                    co,
                    h,
                    ww,
                    pp,
                    nb
                );
            }
            launch!(
                "goodness_tiles_f32",
                geometry::grid1(g_len),
                fn(*const f32, *mut f32, i32, i32, i32, i32, i32, i32, i32, i32),
                gpart.as_ptr(),
                g.as_mut_ptr(),
                bb,
                co,
                h,
                ww,
                pp,
                nb,
                fwd_f16.tile_n as i32,
                mean
            );
            // dz once, the input channels-last again (as the backend's weight gradient makes it), the GEMM of
            // either fp16 tile, and the reduction into PyTorch's layout.
            let scale = asge::backend::dz_scale(s.batch, grid, reduce);
            let mut dz = vec![NAN16; s.c_out.next_multiple_of(128) * geometry::wgrad_pixels(s)];
            launch!(
                "dz_f16",
                geometry::dz_grid(s),
                fn(*const u16, *const f32, *const i32, *mut u16, *mut f32, i32, i32, i32, i32, i32, f32),
                y16.as_ptr(),
                q.as_ptr(),
                cells.as_ptr(),
                dz.as_mut_ptr(),
                part_db.as_mut_ptr(),
                bb,
                co,
                h,
                ww,
                pp,
                scale
            );
            let masks = geometry::pixel_masks(s);
            launch!(
                wgrad_f16.name,
                split.grid,
                smem wgrad_f16.smem,
                fn(*const u16, *const u16, *const i32, *const u16, *mut f32, i32, i32, i32, i32, i32, i32, f32),
                dz.as_ptr(),
                xn.as_ptr(),
                ntaps.as_ptr(),
                masks.as_ptr(),
                part.as_mut_ptr(),
                bb,
                cp as i32,
                co,
                h,
                ww,
                chunk,
                1.0 / scale
            );
            launch!(
                "wgrad_reduce_nhwc_f32",
                geometry::grid1(mk),
                fn(*const f32, *const f32, *mut f32, *mut f32, i32, i32, i32, i32, i32),
                part.as_ptr(),
                part_db.as_ptr(),
                dw.as_mut_ptr(),
                db.as_mut_ptr(),
                co,
                ci,
                cp as i32,
                split.slices as i32,
                db_slices as i32
            );
            from_f16(&y16)
        }
    };
    (y, g, dw, db)
}

#[test]
fn conv_kernels_match_the_cpu_reference() {
    // f32, then fp16 three times: the small forward and weight-gradient tiles, the large ones, and the small
    // forward split over K (the backend picks them by shape; here every case runs every kernel).
    let f16 = geometry::CONV_FWD_F16.into_iter().zip(geometry::WGRAD_F16);
    let runs = [(Precision::F32, (geometry::CONV_FWD_F16[0], geometry::WGRAD_F16[0]))]
        .into_iter()
        .chain(f16.map(|k| (Precision::F16, k)))
        .chain([(Precision::F16, (geometry::CONV_FWD_F16_SPLIT, geometry::WGRAD_F16[0]))]);
    for (p, kernels) in runs {
        let c = CpuBackend::new().with_precision(p);
        let store_rtol = if p == Precision::F16 { 1.1e-3 } else { 1e-4 };
        // The VGG8-like case at batch 2: the emulation runs every thread of every block on one core.
        for (i, case) in conv_cases(2).into_iter().enumerate() {
            let what = match p {
                Precision::F32 => format!("f32 case {i}"),
                Precision::F16 => format!("fp16 ({}, {}) case {i}", kernels.0.name, kernels.1.name),
            };
            let s = case.s;
            let grid = PatchGrid::new(case.p, s.h, s.w);
            let d = s.c_out * grid.cells();
            let (x, w, b, dg) = conv_inputs(&case, i);
            let (y_gpu, g_gpu, dw_gpu, db_gpu) = gpu_conv(p, kernels, &s, &grid, case.reduce, &x, &w, &b, &dg);
            let (mut y, mut g) = (vec![0.0; s.y_len()], vec![0.0; s.batch * d]);
            asge::ops::conv_goodness_fwd::run(
                &c,
                asge::ops::conv_goodness_fwd::Args {
                    layer: 0,
                    s: &s,
                    grid: &grid,
                    reduce: case.reduce,
                    x: &x,
                    w: &w,
                    b: &b,
                    y: &mut y,
                    g: &mut g,
                },
            )
            .unwrap();
            close(&format!("{what} y"), &y_gpu, &y, store_rtol, 1e-5);
            close(&format!("{what} goodness"), &g_gpu, &g, store_rtol, 1e-5);
            let (mut dw, mut db) = (vec![0.0; s.w_len()], vec![0.0; s.c_out]);
            asge::ops::conv_goodness_wgrad::run(
                &c,
                asge::ops::conv_goodness_wgrad::Args {
                    layer: 0,
                    s: &s,
                    grid: &grid,
                    reduce: case.reduce,
                    x: &x,
                    y: &y_gpu,
                    dg: &dg,
                    dw: &mut dw,
                    db: &mut db,
                },
            )
            .unwrap();
            close(&format!("{what} dW"), &dw_gpu, &dw, 1e-3, 1e-4);
            close(&format!("{what} db"), &db_gpu, &db, 1e-3, 1e-4);
        }
    }
}

#[test]
fn loss_output_heads_and_adamw_kernels_match_the_cpu_reference() {
    let c = CpuBackend::new();
    for (batch, dim, classes) in [(1, 16, 10), (3, 1000, 10), (5, 512, 100)] {
        let g: Vec<f32> = randn(batch * dim, 1.0, 1).iter().map(|v| v.abs()).collect();
        let pw = randn(dim * classes, 1.0 / (classes as f64).sqrt(), 2);
        let pb = randn(classes, 1.0 / (classes as f64).sqrt(), 3);
        let labels: Vec<u32> = (0..batch as u32).map(|i| (i * 7) % classes as u32).collect();
        let (mut lg, mut dg, mut st) = (vec![0.0; batch * classes], vec![0.0; batch * dim], vec![0.0; 2]);
        asge::ops::goodness_loss::run(
            &c,
            asge::ops::goodness_loss::Args {
                layer: 0,
                batch,
                dim,
                classes,
                g: &g,
                proj_w: &pw,
                proj_b: &pb,
                labels: &labels,
                logits: &mut lg,
                dg: Some(&mut dg),
                stats: &mut st,
            },
        )
        .unwrap();
        let (mut lg2, mut dg2, mut st2) = (vec![f32::NAN; lg.len()], vec![f32::NAN; dg.len()], vec![0.0f32; 2]);
        launch!(
            "goodness_loss_f32",
            (batch as u32, 1, 1),
            fn(*const f32, *const f32, *const f32, *const u32, *mut f32, *mut f32, *mut f32, i32, i32, i32, i32),
            g.as_ptr(),
            pw.as_ptr(),
            pb.as_ptr(),
            labels.as_ptr(),
            lg2.as_mut_ptr(),
            dg2.as_mut_ptr(),
            st2.as_mut_ptr(),
            batch as i32,
            dim as i32,
            classes as i32,
            1
        );
        close("logits", &lg2, &lg, 1e-4, 1e-5);
        close("dL/dg", &dg2, &dg, 1e-4, 1e-5);
        close("loss", &st2[..1], &st[..1], 1e-4, 0.0);
        assert_eq!(st2[1], st[1], "correct count");
    }
    for p in [Precision::F32, Precision::F16] {
        let c = CpuBackend::new().with_precision(p);
        let store_rtol = if p == Precision::F16 { 1.1e-3 } else { 1e-4 };
        for (batch, ch, h, pool, drop) in output_cases() {
            let what = format!("{} layer output {batch}x{ch}x{h}", p.as_str());
            let y = conv_output(batch * ch * h * h, p);
            let (ho, wo) = if pool.is_some() { (h / 2, h / 2) } else { (h, h) };
            let dropout = drop.map(|p| Dropout { p, key: 0x1234_5678_9abc_def0 });
            let (mut out, mut gap) = (vec![0.0; batch * ch * ho * wo], vec![0.0; batch * ch]);
            asge::ops::layer_output::run(
                &c,
                asge::ops::layer_output::Args {
                    layer: 0,
                    batch,
                    c: ch,
                    h,
                    w: h,
                    pool,
                    dropout,
                    y: &y,
                    out: &mut out,
                    gap: Some(&mut gap),
                },
            )
            .unwrap();
            let pool_i = match pool {
                None => 0,
                Some(PoolKind::Avg) => 1,
                Some(PoolKind::Rms) => 2,
            };
            let (pd, key) = dropout.map_or((0.0, 0), |d| (d.p, d.key));
            let use_drop = dropout.is_some() as i32;
            let mut gap2 = vec![f32::NAN; gap.len()];
            // The backend's split of each sample over blocks, the slices' sums of squares, then the store: in fp16
            // channels-last where C is a multiple of 8 (ops/layer_output/cuda.rs), read back here in NCHW order.
            let nhwc = p == Precision::F16 && ch.is_multiple_of(8);
            let (cpb, slices) = if nhwc {
                geometry::layer_output_split_nhwc(ch, ho * wo)
            } else {
                geometry::layer_output_split(ch, ho * wo)
            };
            let grid = (batch as u32, slices as u32, 1);
            let mut part = vec![f32::NAN; batch * slices];
            let sumsq = (ch as i32, h as i32, h as i32, pool_i, pd, &key as *const u64, use_drop, cpb as i32);
            let args = (ch as i32, h as i32, h as i32, pool_i, pd, &key as *const u64, use_drop, 1i32, cpb as i32);
            let out2 = match p {
                Precision::F32 => {
                    let mut o = vec![f32::NAN; out.len()];
                    launch!(
                        "layer_output_sumsq_f32",
                        grid,
                        fn(*const f32, *mut f32, i32, i32, i32, i32, f32, *const u64, i32, i32),
                        y.as_ptr(),
                        part.as_mut_ptr(),
                        sumsq.0,
                        sumsq.1,
                        sumsq.2,
                        sumsq.3,
                        sumsq.4,
                        sumsq.5,
                        sumsq.6,
                        sumsq.7
                    );
                    launch!(
                        "layer_output_f32",
                        grid,
                        fn(
                            *const f32,
                            *const f32,
                            *mut f32,
                            *mut f32,
                            i32,
                            i32,
                            i32,
                            i32,
                            f32,
                            *const u64,
                            i32,
                            i32,
                            i32,
                        ),
                        y.as_ptr(),
                        part.as_ptr(),
                        o.as_mut_ptr(),
                        gap2.as_mut_ptr(),
                        args.0,
                        args.1,
                        args.2,
                        args.3,
                        args.4,
                        args.5,
                        args.6,
                        args.7,
                        args.8
                    );
                    o
                }
                Precision::F16 => {
                    let y16 = to_f16(&y);
                    let mut o = vec![NAN16; out.len()];
                    launch!(
                        "layer_output_sumsq_f16",
                        grid,
                        fn(*const u16, *mut f32, i32, i32, i32, i32, f32, *const u64, i32, i32),
                        y16.as_ptr(),
                        part.as_mut_ptr(),
                        sumsq.0,
                        sumsq.1,
                        sumsq.2,
                        sumsq.3,
                        sumsq.4,
                        sumsq.5,
                        sumsq.6,
                        sumsq.7
                    );
                    // The NCHW store, or the channels-last one (the same signature).
                    let store_f16 = if nhwc { "layer_output_nhwc_f16" } else { "layer_output_f16" };
                    launch!(
                        store_f16,
                        grid,
                        fn(
                            *const u16,
                            *const f32,
                            *mut u16,
                            *mut f32,
                            i32,
                            i32,
                            i32,
                            i32,
                            f32,
                            *const u64,
                            i32,
                            i32,
                            i32,
                        ),
                        y16.as_ptr(),
                        part.as_ptr(),
                        o.as_mut_ptr(),
                        gap2.as_mut_ptr(),
                        args.0,
                        args.1,
                        args.2,
                        args.3,
                        args.4,
                        args.5,
                        args.6,
                        args.7,
                        args.8
                    );
                    let stored = from_f16(&o);
                    if nhwc {
                        geometry::nchw_from_nhwc(&stored, ch, ho * wo)
                    } else {
                        stored
                    }
                }
            };
            close(&what, &out2, &out, store_rtol, 1e-6);
            close(&format!("{what} gap"), &gap2, &gap, 1e-4, 1e-6);
        }
    }
    // Fusion heads: two heads into one set of logits, softmax CE, each head's gradient.
    let HeadsCase { batch, classes, dims, feats, ws, bs, labels, logits: lg, stats: st, grads: cg } = heads_case();
    let (bi, ni) = (batch as i32, classes as i32);
    let mut s = vec![0.0f32; batch * classes];
    for (k, &cdim) in dims.iter().enumerate() {
        launch!(
            "heads_logits_f32",
            geometry::grid1(batch * classes),
            fn(*const f32, *const f32, *const f32, *mut f32, i32, i32, i32),
            feats[k].as_ptr(),
            ws[k].as_ptr(),
            bs[k].as_ptr(),
            s.as_mut_ptr(),
            bi,
            ni,
            cdim as i32
        );
    }
    let (mut ds, mut st2) = (vec![f32::NAN; batch * classes], vec![0.0f32; 2]);
    launch!(
        "heads_softmax_f32",
        geometry::grid1(batch),
        fn(*const f32, *const u32, *mut f32, *mut f32, i32, i32),
        s.as_ptr(),
        labels.as_ptr(),
        ds.as_mut_ptr(),
        st2.as_mut_ptr(),
        bi,
        ni
    );
    close("head logits", &s, &lg, 1e-4, 1e-5);
    close("head loss", &st2[..1], &st[..1], 1e-4, 0.0);
    assert_eq!(st2[1], st[1], "head correct count");
    for (k, &cdim) in dims.iter().enumerate() {
        let (mut gw, mut gb) = (vec![f32::NAN; classes * cdim], vec![f32::NAN; classes]);
        launch!(
            "heads_grad_f32",
            geometry::grid1(classes * cdim),
            fn(*const f32, *const f32, *mut f32, *mut f32, i32, i32, i32),
            feats[k].as_ptr(),
            ds.as_ptr(),
            gw.as_mut_ptr(),
            gb.as_mut_ptr(),
            bi,
            ni,
            cdim as i32
        );
        close(&format!("head {k} dW"), &gw, &cg[k].0, 1e-4, 1e-5);
        close(&format!("head {k} db"), &gb, &cg[k].1, 1e-4, 1e-5);
    }
    // AdamW, three steps, with the fp16 copy written in the same pass.
    let n = 10_007;
    let (p0, gr) = (randn(n, 0.1, 7), randn(n, 0.01, 8));
    let c16 = CpuBackend::new().with_precision(Precision::F16);
    let (mut p, mut m, mut v, mut copy) = (p0.clone(), vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    let (mut p2, mut m2, mut v2, mut copy2) = (p0.clone(), vec![0.0f32; n], vec![0.0f32; n], vec![NAN16; n]);
    for t in 1..=3 {
        let h = AdamWStep { lr: 2e-4, weight_decay: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, step: t };
        c16.prepare_step(&h.scalars(), &[]).unwrap();
        asge::ops::adamw::run(
            &c16,
            asge::ops::adamw::Args {
                layer: 0,
                len: n,
                p: &mut p,
                grad: &gr,
                m: &mut m,
                v: &mut v,
                copy: Some(&mut copy),
            },
        )
        .unwrap();
        // The kernel reads the step's scalars from memory (the backend's step parameters).
        let hp = h.scalars();
        launch!(
            "adamw_f32",
            geometry::adamw(n),
            fn(*mut f32, *const f32, *mut f32, *mut f32, *mut u16, i32, *const AdamWScalars),
            p2.as_mut_ptr(),
            gr.as_ptr(),
            m2.as_mut_ptr(),
            v2.as_mut_ptr(),
            copy2.as_mut_ptr(),
            n as i32,
            &hp as *const AdamWScalars
        );
    }
    close("adamw", &p2, &p, 0.0, 1e-6);
    close("adamw fp16 copy", &from_f16(&copy2), &copy, 1.1e-3, 0.0);
}

/// The tensor-core self-test (kernels/selftest.cu) through the emulation: every stage (the copy with its zero-filled
/// chunks, ldmatrix, ldmatrix.trans, the two MMAs) holds what the PTX ISA's layouts say, checked by the same code
/// that checks it on a GPU; with its planted fragment-order bug it fails, naming a lane and register of the MMA.
#[test]
fn the_tensor_core_self_test_passes_in_the_emulation_and_fails_on_a_planted_bug() {
    use asge::backend::cuda::selftest;
    let (a, bt) = selftest::inputs();
    let bits = |v: &[half::f16]| v.iter().map(|h| h.to_bits()).collect::<Vec<u16>>();
    let (a, bt) = (bits(&a), bits(&bt));
    for plant in [0, 1] {
        let (mut tiles, mut frags, mut d) = (vec![0u16; 512], vec![0u32; 256], vec![0f32; 256]);
        launch!(
            "tensor_core_selftest",
            (1, 1, 1),
            smem 1024,
            fn(*const u16, *const u16, u32, i32, *mut u16, *mut u32, *mut f32),
            a.as_ptr(),
            bt.as_ptr(),
            selftest::ZERO_MASK,
            plant,
            tiles.as_mut_ptr(),
            frags.as_mut_ptr(),
            d.as_mut_ptr()
        );
        let tiles: Vec<half::f16> = tiles.iter().map(|&b| half::f16::from_bits(b)).collect();
        let r = selftest::check(&tiles, &frags, &d);
        if plant == 0 {
            assert!(r.passed(), "{}", r.verdict());
            assert_eq!(r.checked, 512 + 32 * 8 + 32 * 8, "every value compared");
        } else {
            let v = r.verdict();
            assert!(!r.passed() && v.contains("mma.sync lane") && v.contains("expected"), "{v}");
            assert!(!v.contains("ldmatrix lane"), "the plant is after the loads: {v}");
        }
    }
}

/// The kernels' signatures are written once, in `kernels/*.cu`: build.rs generates the backend's launch wrappers
/// and the driver stand-in's bindings from them. This test's own bindings (tests/emu/launch.cpp's C wrappers and
/// the argument types of every `launch!` above) are written by hand, so they are checked against the same
/// signatures: a kernel whose parameters change fails here until both are updated.
#[test]
fn the_emulation_bindings_agree_with_the_kernels_signatures() {
    use asge::backend::cuda::args::launch::SIGNATURES;
    let sig = |name: &str| -> Vec<(String, String)> {
        let (_, params) = SIGNATURES.iter().find(|(k, _)| *k == name).unwrap_or_else(|| panic!("no kernel {name}"));
        params.iter().map(|(t, n)| (t.to_string(), n.to_string())).collect()
    };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    // launch.cpp: `void emu_<kernel>(GRID, <the kernel's parameters>)`.
    let cpp = std::fs::read_to_string(root.join("tests/emu/launch.cpp")).unwrap();
    let mut wrapped = Vec::new();
    for chunk in cpp.split("void emu_").skip(1) {
        let name = &chunk[..chunk.find('(').unwrap()];
        let list = &chunk[chunk.find('(').unwrap() + 1..chunk.find(')').unwrap()];
        let params: Vec<(String, String)> = list
            .split(',')
            .map(|p| p.split_whitespace().collect::<Vec<_>>().join(" "))
            .filter(|p| p != "GRID")
            .map(|p| {
                let at = p.rfind([' ', '*']).unwrap();
                (p[..=at].trim().to_string(), p[at + 1..].to_string())
            })
            .collect();
        assert_eq!(params, sig(name), "tests/emu/launch.cpp: emu_{name}'s parameters differ from kernels/*.cu");
        wrapped.push(name.to_string());
    }
    for (k, _) in SIGNATURES {
        assert!(wrapped.iter().any(|w| w == k), "tests/emu/launch.cpp has no wrapper for kernel {k}");
    }
    // This file's launch! calls: the Rust argument types, from the C++ ones.
    let rust = |c: &str| -> &'static str {
        match c {
            "const float*" => "*const f32",
            "float*" => "*mut f32",
            "const f16_bits*" => "*const u16",
            "f16_bits*" => "*mut u16",
            "const int*" => "*const i32",
            "const unsigned int*" => "*const u32",
            "const unsigned short*" => "*const u16",
            "const unsigned long long*" => "*const u64",
            "int" => "i32",
            "float" => "f32",
            "unsigned long long" => "u64",
            "unsigned" => "u32",
            "unsigned*" => "*mut u32",
            "const AdamWScalars*" => "*const AdamWScalars",
            other => panic!("no Rust type for {other}"),
        }
    };
    let src = std::fs::read_to_string(root.join("tests/kernel_emulation.rs")).unwrap();
    let body = &src[..src.find("fn the_emulation_bindings_agree").unwrap()];
    let mut checked = 0;
    for call in body.split("launch!(").skip(1) {
        let name_expr = call.split(',').next().unwrap().trim().trim_matches('"').to_string();
        if name_expr.starts_with('$') {
            continue; // the macro's own definition
        }
        let f = call.find("fn(").unwrap();
        let close = f + call[f..].find(')').unwrap();
        let types: Vec<String> =
            call[f + 3..close].split(',').map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect();
        let kernels: Vec<&str> = match name_expr.as_str() {
            "fwd_f16.name" => geometry::CONV_FWD_F16.iter().map(|k| k.name).collect(),
            "wgrad_f16.name" => geometry::WGRAD_F16.iter().map(|k| k.name).collect(),
            "store_f16" => vec!["layer_output_f16", "layer_output_nhwc_f16"],
            n => vec![SIGNATURES.iter().find(|(k, _)| *k == n).map(|(k, _)| *k).unwrap_or_else(|| panic!("{n}"))],
        };
        for k in kernels {
            let want: Vec<String> = sig(k).iter().map(|(t, _)| rust(t).to_string()).collect();
            assert_eq!(
                types, want,
                "tests/kernel_emulation.rs: the launch of {k} passes other types than its signature"
            );
            checked += 1;
        }
    }
    assert!(checked >= 15, "only {checked} launches checked");
}

/// The emulator's cp.async and dynamic-shared-memory rules (tests/emu/cuda_emu.h), on a 3-stage pipeline kernel
/// written for the purpose (tests/emu/pipeline_probe.cuh): the correct pipeline streams its tiles through
/// unchanged, and each planted hazard (a wait one group short, no barrier after the wait, a stage reused before
/// the barrier, the short wait again read through ldmatrix, a barrier before the wait instead of after it) faults with the rule it broke, on every run:
/// the emulation lands a copy as late as the hardware may and reads in-flight bytes as NaN, so such a kernel
/// cannot pass by luck.
#[test]
fn cp_async_pipeline_hazards_fault_in_the_emulation() {
    type Probe = unsafe extern "C" fn(*const u32, *mut u32, i32, i32) -> *const std::ffi::c_char;
    let steps = 7;
    let src: Vec<u32> = (0..steps * 256 * 4).map(|i| (i as u32).wrapping_mul(2654435761)).collect();
    let run = |mode: i32| -> (String, Vec<u32>) {
        let mut out = vec![0u32; src.len()];
        let _one_at_a_time = EMU.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: probe_pipeline reads and writes steps * 256 * 4 words of these buffers; it returns a
        // NUL-terminated string that stays valid until the next launch (read here, under the lock).
        let msg = unsafe {
            let f: libloading::Symbol<Probe> = lib().get(b"probe_pipeline\0").expect("probe_pipeline");
            let m = f(src.as_ptr(), out.as_mut_ptr(), steps as i32, mode);
            std::ffi::CStr::from_ptr(m).to_string_lossy().into_owned()
        };
        (msg, out)
    };
    let (msg, out) = run(0);
    assert_eq!(msg, "", "the correct pipeline faulted");
    for t in 0..steps {
        for tid in 0..256 {
            let other = (tid + 64) % 256;
            for q in 0..4 {
                assert_eq!(out[(t * 256 + tid) * 4 + q], src[(t * 256 + other) * 4 + q], "step {t} thread {tid}");
            }
        }
    }
    let planted = [
        (1, "still in flight"),
        (2, "no thread has written in this block"),
        (3, "a stage reused before every thread has finished reading it"),
        (4, "still in flight"),
        (5, "completed since the last barrier"),
    ];
    for (mode, want) in planted {
        let (msg, _) = run(mode);
        println!("hazard {mode}: {msg}");
        assert!(msg.contains(want), "planted hazard {mode} was not caught as `{want}`: `{msg}`");
    }
}
