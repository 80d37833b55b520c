//! The CUDA backend. In CI (no GPU): every kernel compiles with the real NVRTC for sm_80 and sm_90, and asking
//! for a GPU that is not there is an error, not a panic. On a GPU (`cargo test -- --ignored`, or
//! tools/gpu-check.sh): every op against the CPU reference on fresh random inputs with awkward shapes, outputs
//! poisoned before each launch; a whole VGG8 training step against the CPU step; three steps twice, equal.
//!
//! Tolerances (`|gpu - cpu| <= atol + rtol * |cpu|`): both sides compute in f32 and differ only in summation
//! order. A dot product of K terms of magnitude ~1 carries an error of ~sqrt(K) * 6e-8 relative to its terms'
//! scale; K <= 4608 here, so 1e-4 relative with an absolute floor of 1e-5 times the output's largest magnitude
//! is ~100x the expected difference and far below a semantic error (a wrong bin, mask or scale is >= 1e-2).
//!
//! fp16 is compared with the CPU backend's fp16 emulation, which rounds exactly where the GPU stores fp16. The
//! products of two fp16 values are exact in f32, so the sums again differ only in order; but a value stored in
//! fp16 can then round to the neighbouring fp16 number, one ulp = 2^-11 (4.9e-4) relative, 2^-10 just above a
//! power of two. Stored fp16 outputs get rtol 1.1e-3 (one ulp, whichever side of a power of two); a wrong scale,
//! tile or fragment index is off by far more. The patch goodness is a mean of squares of stored values: squaring
//! doubles a relative error ((1 + e)^2 = 1 + 2e + e^2) and a mean of values each within 2e of theirs is within 2e
//! itself, so it gets two ulps, rtol 2e-3 (2^-9 = 1.95e-3, and f32 summation far below that). Under round-to-
//! nearest accumulation a stored value rarely straddles a rounding boundary and the goodness stays near one ulp;
//! accumulation by truncation (Hopper's tensor cores) moves every sum the same way and makes it common, which is
//! where the second ulp is needed (seen under the stand-in's truncating model: 1.4e-3 on one cell).
#![cfg(feature = "cuda")]

mod common;

use asge::backend::cpu::CpuBackend;
use asge::backend::cuda::{self, nvrtc, CudaBackend, CudaBuf};
use asge::backend::prelude::*;
use asge::backend::Precision;
use asge::model::{self, ModelOptions, Params, PatchGrid};
use asge::train::{AdamW, Net};
use common::{close, conv_cases, conv_inputs, randn};

#[test]
fn every_kernel_compiles_with_nvrtc() {
    assert!(
        nvrtc::available(),
        "NVRTC cannot be loaded: install it (tools/test.sh does: pip install nvidia-cuda-nvrtc==13.0.88) and put its \\
         lib folder on LD_LIBRARY_PATH"
    );
    let mut names = Vec::new();
    for arch in ["sm_80", "sm_90"] {
        for (module, result) in nvrtc::compile_all(arch) {
            if let Err(e) = result {
                panic!("{module} for {arch}: {e:#}");
            }
        }
    }
    for (_, src, _) in nvrtc::KERNELS {
        names.extend(nvrtc::entry_points(src));
    }
    for f in [
        "conv_goodness_fwd_f32",
        "conv_fwd_nhwc_f16",
        "conv_fwd_nhwc_f16_l",
        "nhwc_pad_f16",
        "krsc_pad_f16",
        "patch_goodness_f32",
        "goodness_tiles_f32",
        "conv_fwd_splitk_f16",
        "conv_goodness_wgrad_f32",
        "dz_f16",
        "conv_wgrad_nhwc_f16",
        "conv_wgrad_nhwc_f16_l",
        "wgrad_reduce_f32",
        "wgrad_reduce_nhwc_f32",
        "goodness_loss_f32",
        "layer_output_f32",
        "layer_output_f16",
        "layer_output_nhwc_f16",
        "heads_logits_f32",
        "heads_softmax_f32",
        "heads_grad_f32",
        "adamw_f32",
    ] {
        assert!(names.contains(&f), "no kernel {f} in kernels/ (found {names:?})");
    }
}

#[test]
fn every_kernel_assembles_to_cubin_for_old_drivers() {
    // The path taken when the driver is older than NVRTC: machine code, no driver JIT. NVRTC assembles it
    // without a GPU, so CI checks it: every module is an ELF image, and the on-disk cache hands back the same
    // bytes (the second call reads the file).
    assert!(nvrtc::available(), "NVRTC cannot be loaded (see every_kernel_compiles_with_nvrtc)");
    // The cache folder is passed, not set in the environment: other tests of this binary load kernels meanwhile.
    let cache = common::temp_dir("cubin-cache");
    let cached =
        |module, src, hash| nvrtc::compile_cached_in(Some(&cache), module, src, hash, "sm_80", nvrtc::Format::Cubin);
    for (module, src, hash) in nvrtc::KERNELS {
        let cubin = nvrtc::compile_cubin(module, src, "sm_90").unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(&cubin[..4], b"\x7fELF", "{module}: not an ELF image");
        let first = cached(module, src, *hash).unwrap();
        let again = cached(module, src, *hash).unwrap();
        assert_eq!(first.as_bytes(), again.as_bytes(), "{module}: the cached CUBIN differs");
        assert!(std::fs::read_dir(&cache).unwrap().any(|e| {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            n.starts_with(module) && n.contains("-sm_80-") && n.ends_with(".cubin")
        }));
    }
    assert!(format!("{:#}", nvrtc::format_from(Some("elf"), 13000).unwrap_err()).contains("ASGE_KERNEL_FORMAT=elf"));
    assert_eq!(nvrtc::format_from(Some("cubin"), 13000).unwrap(), nvrtc::Format::Cubin);
    // A driver older than NVRTC gets CUBIN; a current one PTX.
    assert_eq!(nvrtc::format_from(None, 1000).unwrap(), nvrtc::Format::Cubin);
    assert_eq!(nvrtc::format_from(None, nvrtc::version().unwrap()).unwrap(), nvrtc::Format::Ptx);
}

#[test]
fn no_kernel_spills_registers() {
    // ptxas' own report through NVRTC (no GPU needed): a spill or a stack frame means local-memory traffic in an
    // inner loop, a performance bug. The tensor-core kernels are the ones at risk (32 accumulators and fragments per thread).
    assert!(nvrtc::available(), "NVRTC cannot be loaded (see every_kernel_compiles_with_nvrtc)");
    for arch in ["sm_80", "sm_90"] {
        let r = nvrtc::resources(arch).unwrap_or_else(|e| panic!("{e:#}"));
        let names: Vec<&str> = r.iter().map(|k| k.kernel.as_str()).collect();
        assert!(names.contains(&"conv_wgrad_nhwc_f16_l"), "{arch}: ptxas report lists {names:?}");
        for k in &r {
            assert!(k.registers > 0, "{arch} {}: no register count parsed", k.kernel);
            assert_eq!(
                k.spill_bytes, 0,
                "{arch} {}: {} bytes of spills ({} registers)",
                k.kernel, k.spill_bytes, k.registers
            );
            // A local array indexed at run time (a loop the compiler did not unroll) costs the same traffic.
            assert_eq!(k.stack_bytes, 0, "{arch} {}: {} bytes of local stack", k.kernel, k.stack_bytes);
        }
    }
}

#[test]
fn the_fp16_kernels_tap_and_cell_tables_say_what_the_kernels_read() {
    use cuda::geometry::{cell_table, tap_table};
    // Taps: offset from the window origin above the 9-bit mask of the tap's position in the window.
    let (c_in, h, w) = (3, 5, 7);
    let t = tap_table(c_in, h, w).unwrap();
    assert_eq!(t.len(), 256, "K = 27 padded to one 256-tap tile");
    for (k, &e) in t.iter().enumerate() {
        let e = e as u32;
        if k < 27 {
            let (ci, kh, kw) = (k / 9, (k % 9) / 3, k % 3);
            assert_eq!((e >> 9) as usize, ci * h * w + kh * w + kw, "tap {k} offset");
            assert_eq!(e & 511, 1 << (k % 9), "tap {k} mask bit");
        } else {
            assert_eq!(e, 0, "padding tap {k} must match no mask");
        }
    }
    assert_eq!(tap_table(64, 3, 3).unwrap().len(), 768, "K = 576 rounds up to 3 tiles");
    let err = tap_table(512, 128, 128).unwrap_err();
    assert!(err.contains("512x128x128") && err.contains("2^23"), "{err}");
    // Cells: H = 28, P = 8 bins are [0,4), [3,7), [7,11), [10,14), ...: rows 3 and 10 lie in two bins each.
    let grid = PatchGrid::new(8, 28, 28);
    let (cells, div) = cell_table(&grid, model::GoodnessReduce::Mean).unwrap();
    let at = |oh: usize, ow: usize| {
        let c = cells[oh * 28 + ow] as u32;
        (c & 255, (c >> 8) & 255, (c >> 16) & 255, c >> 24)
    };
    assert_eq!(at(0, 0), (0, 0, 0, 0));
    assert_eq!(at(3, 5), (0, 1, 1, 1));
    assert_eq!(at(7, 3), (2, 2, 0, 1));
    assert_eq!(at(10, 7), (2, 3, 2, 2));
    assert_eq!(at(27, 27), (7, 7, 7, 7));
    assert_eq!(div[0], 16.0, "cell (0, 0) is 4 x 4");
    let (_, div_sum) = cell_table(&grid, model::GoodnessReduce::Sum).unwrap();
    assert!(div_sum.iter().all(|&d| d == 1.0));
}

#[test]
fn the_fp16_forward_tile_follows_the_shape() {
    use cuda::geometry::{conv_fwd, conv_fwd_kernel, CONV_FWD_F16};
    let s = |batch, c_out, side| asge::backend::ConvShape { batch, c_in: 16, c_out, h: side, w: side };
    // The parity tests' 128-channel case at batch 128: 128 blocks of 128 x 256.
    assert_eq!(conv_fwd_kernel(&s(128, 128, 16), Precision::F16), CONV_FWD_F16[1]);
    assert_eq!(conv_fwd(&s(128, 128, 16), Precision::F16), (128, 1, 1));
    // One block fewer than a wave: the small tile.
    assert_eq!(conv_fwd_kernel(&s(127, 128, 16), Precision::F16), CONV_FWD_F16[0]);
    // Fewer than 128 channels, or too few blocks (VGG8's 4x4 layer at batch 128: 16 x 4), keep 64 x 128.
    assert_eq!(conv_fwd_kernel(&s(128, 64, 16), Precision::F16), CONV_FWD_F16[0]);
    assert_eq!(conv_fwd_kernel(&s(128, 512, 4), Precision::F16), CONV_FWD_F16[0]);
    assert_eq!(conv_fwd(&s(128, 512, 4), Precision::F16), (16, 8, 1));
    assert_eq!(conv_fwd_kernel(&s(128, 512, 4), Precision::F32).name, "conv_goodness_fwd_f32");
    // Split-K where the small tile's grid gives fewer than two blocks per SM: VGG8 width 1's 4x4 layer (128
    // blocks, 72 K steps: 2 runs of 36, 256 blocks) and 2x2 layer (32 blocks: 8 runs of 9); none for the large
    // layers.
    use cuda::geometry::conv_fwd_splits;
    let vgg = |c_in, c_out, side| asge::backend::ConvShape { batch: 128, c_in, c_out, h: side, w: side };
    let splits = |s: asge::backend::ConvShape| conv_fwd_splits(&s, &conv_fwd_kernel(&s, Precision::F16));
    assert_eq!(splits(vgg(512, 512, 4)), 2);
    assert_eq!(splits(vgg(512, 512, 2)), 8);
    assert_eq!(splits(vgg(256, 512, 16)), 1);
    assert_eq!(splits(vgg(3, 128, 32)), 1, "2 K steps: nothing to split");
}

#[test]
fn the_layer_output_split_gives_each_warp_or_thread_a_channel() {
    use cuda::geometry::layer_output_split;
    // (channels per block, blocks per sample): ~2048 values a block, a channel per warp on maps of 32+ values
    assert_eq!(layer_output_split(64, 256), (8, 8));
    assert_eq!(layer_output_split(32, 1024), (8, 4));
    assert_eq!(layer_output_split(70, 64), (24, 3));
    assert_eq!(layer_output_split(5, 49), (5, 1));
    // a channel per thread below 32 values
    assert_eq!(layer_output_split(512, 16), (256, 2));
    assert_eq!(layer_output_split(128, 4), (128, 1));
    // never more slices than the grid's y holds
    let (cpb, slices) = layer_output_split(1 << 20, 1024);
    assert!(slices <= 65_535 && cpb * slices >= 1 << 20, "{cpb} x {slices}");
    // the channels-last fp16 store: whole 8-channel groups a block (a thread each, at most 256)
    use cuda::geometry::layer_output_split_nhwc;
    assert_eq!(layer_output_split_nhwc(64, 256), (8, 8));
    assert_eq!(layer_output_split_nhwc(72, 64), (24, 3));
    assert_eq!(layer_output_split_nhwc(600, 4), (304, 2));
    assert_eq!(layer_output_split_nhwc(4096, 4), (512, 8));
    assert_eq!(layer_output_split_nhwc(8192, 1), (2048, 4));
}

#[test]
fn the_fp16_weight_gradient_tile_follows_the_shape() {
    use cuda::geometry::{wgrad, wgrad_kernel, WGRAD_F16};
    let s = |c_in| asge::backend::ConvShape { batch: 128, c_in, c_out: 256, h: 16, w: 16 };
    // K = 9 Cp (C_in padded to a multiple of 8): the 128 x 256 tile from K = 1024 on (113 channels pad to 120:
    // K = 1080, the parity tests' case), the 64 x 128 tile below.
    assert_eq!(wgrad_kernel(&s(120), Precision::F16), WGRAD_F16[1]);
    assert_eq!(wgrad_kernel(&s(113), Precision::F16), WGRAD_F16[1]);
    assert_eq!(wgrad_kernel(&s(112), Precision::F16), WGRAD_F16[0]);
    assert_eq!(wgrad_kernel(&s(3), Precision::F16), WGRAD_F16[0]);
    let split = wgrad(&s(256), Precision::F16);
    assert_eq!((split.grid.0, split.grid.1), (9, 2), "K = 2304 in 256-column tiles, 256 channels in 128s");
    assert_eq!(split.chunk % 32, 0, "slices hold whole 32-pixel steps");
    let small = wgrad(&s(3), Precision::F16);
    assert_eq!(small.chunk % 64, 0, "slices hold whole 64-pixel steps");
    assert_eq!(wgrad_kernel(&s(256), Precision::F32).name, "conv_goodness_wgrad_f32");
}

#[test]
fn a_missing_gpu_is_an_error_not_a_panic() {
    match cuda::probe() {
        Err(e) => {
            let err = CudaBackend::new(0).err().expect("CudaBackend::new succeeded although probe() failed");
            assert!(format!("{err:#}").contains("cuda:0"), "{err:#} (probe: {e})");
        }
        Ok(n) => {
            let err = CudaBackend::new(n + 7).err().expect("a device past the last one opened");
            assert!(format!("{err:#}").contains("device"), "{err:#}");
        }
    }
    assert!(cuda::parse_device("cuda:x").is_err());
    assert_eq!(cuda::parse_device("cuda:1").unwrap(), 1);
}

/// Device 0: a GPU, or the driver stand-in with ASGE_CUDA_STANDIN=1. Without either this fails (it is only
/// called by the tests that are ignored unless a device or the stand-in is there), and says where it ran.
fn gpu() -> CudaBackend {
    let n = cuda::probe().unwrap_or_else(|e| panic!("this test needs a CUDA GPU or ASGE_CUDA_STANDIN=1: {e:#}"));
    assert!(n > 0);
    let be = CudaBackend::new(0).unwrap();
    ran_on(&be);
    be
}

/// Prints `ran on: <device>` once per test thread (the test's output says whether a GPU or the stand-in ran it).
fn ran_on(be: &CudaBackend) {
    thread_local!(static SAID: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });
    if !SAID.with(|s| s.replace(true)) {
        println!("ran on: {}", be.device_name());
    }
}

const PRECISIONS: [Precision; 2] = [Precision::F32, Precision::F16];

/// Uploads `host`, or a NaN-poisoned buffer of `len` when `host` is empty (outputs must be fully written).
fn dev(be: &CudaBackend, host: &[f32], len: usize) -> CudaBuf {
    if host.is_empty() {
        asge::ops::parity::poisoned(be, len).unwrap()
    } else {
        be.upload(host).unwrap()
    }
}

/// [`dev`] for a conv operand: stored in the backend's precision.
fn operand(be: &CudaBackend, host: &[f32], len: usize) -> CudaBuf {
    if host.is_empty() {
        asge::ops::parity::poisoned_operand(be, len).unwrap()
    } else {
        be.upload_operand(host).unwrap()
    }
}

/// The worst ratio of error to tolerance of one parity pass, per output.
#[derive(Default)]
struct Worst {
    y: f32,
    goodness: f32,
    dw: f32,
    db: f32,
}

/// Runs the conv ops' parity checks (`src/ops/conv_goodness_{fwd,wgrad}/parity.rs`: the cases' forward, then
/// the weight gradient from the device's output, against the CPU reference in `g`'s precision) on every case,
/// and checks that an fp16 weight gradient reads the forward's input copy. Returns the worst ratios and the
/// GFLOP and seconds spent on the device.
fn conv_parity(g: &CudaBackend, cases: &[common::ConvCase], label: &str) -> (Worst, f64, f64) {
    use asge::ops::{conv_goodness_fwd, conv_goodness_wgrad};
    let precision = g.precision();
    let (mut worst, mut flop, mut seconds) = (Worst::default(), 0.0f64, 0.0f64);
    for (i, case) in cases.iter().enumerate() {
        let what = format!("{} {label} case {i}", precision.as_str());
        let (f, fwd) = conv_goodness_fwd::parity::check_case(g, case, i, &what).unwrap_or_else(|e| panic!("{e:#}"));
        let reused = g.input_copies_reused();
        let w = conv_goodness_wgrad::parity::check_case(g, case, i, &fwd, &what).unwrap_or_else(|e| panic!("{e:#}"));
        // In fp16 the weight gradient reads the forward's channels-last copy of x.
        assert_eq!(g.input_copies_reused() - reused, (precision == Precision::F16) as usize, "{what}");
        let s = case.s;
        seconds += f.seconds + w.seconds;
        flop += 4.0 * (s.batch * s.h * s.w * s.c_out * s.c_in * 9) as f64;
        worst = Worst {
            y: worst.y.max(f.y),
            goodness: worst.goodness.max(f.goodness),
            dw: worst.dw.max(w.dw),
            db: worst.db.max(w.db),
        };
    }
    (worst, flop, seconds)
}

/// The batch of the conv parity passes over every forced fp16 variant: 128 on a GPU, 16 under the stand-in (its
/// emulator runs ~1 GFLOP/s; the shapes stay the same).
fn variant_batch() -> usize {
    if cuda::standin::requested() {
        16
    } else {
        128
    }
}

#[test]
#[ignore = "needs a CUDA GPU or the stand-in (ASGE_CUDA_STANDIN=1)"]
fn conv_fwd_and_wgrad_match_cpu() {
    let rounding = if cuda::standin::requested() {
        let truncating = std::env::var("ASGE_STANDIN_MMA_ROUNDING").is_ok_and(|v| v == "truncate");
        let g = gpu();
        assert_eq!(cuda::standin::mma_truncates().unwrap(), truncating, "the stand-in's MMA rounding");
        drop(g);
        if truncating {
            "stand-in MMAs truncating every addition"
        } else {
            "stand-in MMAs rounding to nearest"
        }
    } else {
        "the device's MMAs"
    };
    // A VGG-like layer that picks the 128 x 256 weight-gradient tile by its shape (128 channels, K = 1152).
    let wide = common::ConvCase {
        s: asge::backend::ConvShape { batch: variant_batch(), c_in: 128, c_out: 128, h: 8, w: 8 },
        p: 2,
        reduce: model::GoodnessReduce::Mean,
    };
    for precision in PRECISIONS {
        let g = gpu().with_precision(precision);
        let mut cases = conv_cases(128);
        if precision == Precision::F16 {
            assert_eq!(g.conv_kernels(&wide.s).unwrap()[1], "conv_wgrad_nhwc_f16_l", "the wide case's choice");
            cases.push(common::ConvCase { ..wide });
        }
        let (worst, flop, seconds) = conv_parity(&g, &cases, "by shape");
        println!(
            "{} conv forward + weight gradient on {}: {:.2} GFLOP in {:.2} s, {:.2} GFLOP/s",
            precision.as_str(),
            g.device_name(),
            flop / 1e9,
            seconds,
            flop / 1e9 / seconds
        );
        println!(
            "parity {} kernels by shape ({rounding}): worst error/tolerance y {:.2}, goodness {:.2}, dW {:.2}, db {:.2}",
            precision.as_str(),
            worst.y,
            worst.goodness,
            worst.dw,
            worst.db
        );
    }
    // Every fp16 GEMM variant on every case, whatever the shapes would pick.
    for_each_variant(&conv_cases(variant_batch()), rounding);
}

/// The three pairs that run every fp16 GEMM kernel: both small tiles, both large tiles, the split-K forward.
const VARIANTS: [(cuda::geometry::FwdTile, cuda::geometry::WgradTile); 3] = {
    use cuda::geometry::{FwdTile, WgradTile};
    [(FwdTile::Small, WgradTile::Small), (FwdTile::Large, WgradTile::Large), (FwdTile::SplitK, WgradTile::Small)]
};

/// Conv parity of `cases` with each of [`VARIANTS`] forced, one `parity fp16 <fwd> + <wgrad>` line each (the
/// lines tools/gpu-check.sh reports kernel by kernel).
fn for_each_variant(cases: &[common::ConvCase], rounding: &str) {
    for (fwd, wgrad) in VARIANTS {
        let tiles = cuda::geometry::Tiles { fwd: Some(fwd), wgrad: Some(wgrad) };
        let g = gpu().with_precision(Precision::F16).with_tiles(tiles);
        let [kf, kw] = g.conv_kernels(&cases[0].s).unwrap();
        let mark = cuda::standin::requested().then(|| cuda::standin::launches_logged().unwrap());
        let (worst, _, _) = conv_parity(&g, cases, &format!("{kf} + {kw}"));
        if let Some(mark) = mark {
            // The stand-in's launch log shows the forced kernels ran, and no other GEMM variant did, on this
            // backend's streams (other tests launch on theirs meanwhile).
            let mine: Vec<u64> = g.streams().iter().map(|s| s.cu_stream() as u64).collect();
            let ran: std::collections::BTreeSet<String> = cuda::standin::launches_since(mark)
                .unwrap()
                .into_iter()
                .filter(|l| mine.contains(&l.stream) && l.kernel.starts_with("conv_"))
                .map(|l| l.kernel)
                .collect();
            let mut want: std::collections::BTreeSet<String> = [kf, kw].map(String::from).into();
            if kf == "conv_fwd_nhwc_f16_sk" {
                want.insert("conv_fwd_splitk_f16".into());
            }
            assert_eq!(ran, want, "the GEMM kernels that ran with {kf} + {kw} forced");
        }
        println!(
            "parity fp16 {kf} + {kw} ({rounding}): worst error/tolerance y {:.2}, goodness {:.2}, dW {:.2}, db {:.2}",
            worst.y, worst.goodness, worst.dw, worst.db
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU or the stand-in (ASGE_CUDA_STANDIN=1)"]
fn the_tensor_core_self_test_passes_and_names_a_planted_fragment_bug() {
    let g = gpu();
    let r = cuda::selftest::run(&g, false).unwrap();
    println!("self-test on {}: {}", g.device_name(), r.verdict());
    assert!(r.passed(), "{}", r.verdict());
    let planted = cuda::selftest::run(&g, true).unwrap();
    assert!(!planted.passed() && planted.verdict().contains("mma.sync lane"), "{}", planted.verdict());
}

#[test]
#[ignore = "needs a CUDA GPU or the stand-in (ASGE_CUDA_STANDIN=1)"]
fn every_fp16_gemm_variant_on_one_small_case() {
    // The quick form of the test above (tools/gpu-check.sh dry-run): one VGG-like layer at batch 2 through every
    // fp16 GEMM kernel.
    let case = conv_cases(2).swap_remove(3);
    for_each_variant(&[case], "one small case");
}

#[test]
#[ignore = "needs a CUDA GPU or the stand-in (ASGE_CUDA_STANDIN=1)"]
fn the_weight_gradient_reuses_the_forwards_input_copy_only_while_it_is_current() {
    // fp16: the forward's channels-last copy of x serves the layer's weight gradient, unless x was written since
    // or another forward on the lane replaced the copy; either way dW must be the one of the x it is given.
    let g = gpu().with_precision(Precision::F16);
    let c = CpuBackend::new().with_precision(Precision::F16);
    let case = conv_cases(2).swap_remove(1);
    let s = case.s;
    let grid = PatchGrid::new(case.p, s.h, s.w);
    let (x, w, b, dg) = conv_inputs(&case, 1);
    let x2: Vec<f32> = x.iter().map(|v| asge::backend::round_f16(1.5 - v)).collect();
    let (mut xd, wd, bd, dgd) = (operand(&g, &x, 0), operand(&g, &w, 0), dev(&g, &b, 0), dev(&g, &dg, 0));
    let (mut yd, mut gd) = (operand(&g, &[], s.y_len()), dev(&g, &[], s.batch * s.c_out * grid.cells()));
    let other = operand(&g, &x2, 0);
    let forward = |x: &CudaBuf, y: &mut CudaBuf, gd: &mut CudaBuf| {
        let a = asge::ops::conv_goodness_fwd::Args {
            layer: 0,
            s: &s,
            grid: &grid,
            reduce: case.reduce,
            x,
            w: &wd,
            b: &bd,
            y,
            g: gd,
        };
        asge::ops::conv_goodness_fwd::run(&g, a).unwrap();
    };
    let check = |g: &CudaBackend, xd: &CudaBuf, yd: &CudaBuf, host_x: &[f32], what: &str| {
        let mut dwd = dev(g, &[], s.w_len());
        let mut dbd = dev(g, &[], s.c_out);
        asge::ops::conv_goodness_wgrad::run(
            g,
            asge::ops::conv_goodness_wgrad::Args {
                layer: 0,
                s: &s,
                mean_over: s.batch,
                grid: &grid,
                reduce: case.reduce,
                x: xd,
                y: yd,
                dg: &dgd,
                dw: &mut dwd,
                db: &mut dbd,
            },
        )
        .unwrap();
        let y = g.read(yd, s.y_len()).unwrap();
        let (mut dw, mut db) = (vec![0.0; s.w_len()], vec![0.0; s.c_out]);
        asge::ops::conv_goodness_wgrad::run(
            &c,
            asge::ops::conv_goodness_wgrad::Args {
                layer: 0,
                s: &s,
                mean_over: s.batch,
                grid: &grid,
                reduce: case.reduce,
                x: &host_x.to_vec(),
                y: &y,
                dg: &dg,
                dw: &mut dw,
                db: &mut db,
            },
        )
        .unwrap();
        close(&format!("{what} dW"), &g.read(&dwd, s.w_len()).unwrap(), &dw, 1e-3, 1e-4);
    };
    // x written after the forward: the copy is stale and is made again.
    forward(&xd, &mut yd, &mut gd);
    g.write(&mut xd, &x2).unwrap();
    let reused = g.input_copies_reused();
    check(&g, &xd, &yd, &x2, "x written since the forward");
    assert_eq!(g.input_copies_reused(), reused, "a copy of x's old contents was reused");
    // Another buffer's forward in between: the copy is the other buffer's.
    g.write(&mut xd, &x).unwrap();
    forward(&xd, &mut yd, &mut gd);
    let mut y_other = operand(&g, &[], s.y_len());
    forward(&other, &mut y_other, &mut gd);
    check(&g, &xd, &yd, &x, "another forward in between");
    assert_eq!(g.input_copies_reused(), reused, "another buffer's copy was reused");
    // Right after its own forward: reused, and still right.
    forward(&other, &mut y_other, &mut gd);
    check(&g, &other, &y_other, &x2, "right after the forward");
    assert_eq!(g.input_copies_reused(), reused + 1, "the forward's copy was not reused");
}

/// Each op's parity check, written once in its folder (`src/ops/<op>/parity.rs`: the cases, the CPU reference
/// in the backend's precision, the tolerances argued there), run here in both precisions on a GPU or the
/// stand-in. The conv ops' checks run in `conv_fwd_and_wgrad_match_cpu` and the variant tests above (through
/// `conv_parity`, which adds the fp16 input copy's reuse and the device's time).
mod parity {
    use super::{gpu, PRECISIONS};

    macro_rules! parity_tests {
        ($($op:ident),* $(,)?) => {$(
            #[test]
            #[ignore = "needs a CUDA GPU or the stand-in (ASGE_CUDA_STANDIN=1)"]
            fn $op() {
                for precision in PRECISIONS {
                    let be = gpu().with_precision(precision);
                    asge::ops::$op::parity::check(&be).unwrap_or_else(|e| panic!("{}: {e:#}", precision.as_str()));
                }
            }
        )*};
    }

    parity_tests!(goodness_loss, layer_output, fusion_heads, adamw);
}

/// The batch of the VGG8 step tests: 64 on a GPU; 16 under the stand-in, whose emulator runs ~1 GFLOP/s (still
/// every kernel variant the shapes pick, and every layer).
fn vgg8_batch() -> usize {
    if cuda::standin::requested() {
        16
    } else {
        64
    }
}

/// `steps` VGG8 training steps (width 0.125, MNIST-shaped random inputs, dropout on): every step's per-layer and
/// head losses, the parameters after the last step, and the conv weight gradients of the last step.
fn vgg8_steps<B: Backend>(be: B, steps: u64) -> (Vec<Vec<f64>>, Params, Vec<Vec<f32>>) {
    let spec = model::resolve("vgg8", 1, 32, 10, &ModelOptions { width: 0.125, ..Default::default() }).unwrap();
    let params = Params::init(&spec, 5);
    let b = vgg8_batch();
    let mut net = Net::new(be, spec, &params, AdamW::default(), b).unwrap();
    let mut losses = Vec::new();
    for t in 1..=steps {
        let x = randn(b * 32 * 32, 1.0, 900 + t).iter().map(|v| v.abs()).collect::<Vec<f32>>();
        let labels: Vec<u32> = (0..b as u32).map(|i| (i * 3 + t as u32) % 10).collect();
        let s = net.train_step(&x, &labels, 2e-4, t, Some((0.1, 77 + t))).unwrap();
        losses.push(s.layer_loss.iter().copied().chain([s.head_loss]).collect());
    }
    let grads = net.layers.iter().map(|l| net.backend().read(&l.conv_w.grad, l.conv_w.len).unwrap()).collect();
    (losses, net.params().unwrap(), grads)
}

#[test]
#[ignore = "needs a CUDA GPU or the stand-in (ASGE_CUDA_STANDIN=1)"]
fn an_fp16_layer_reads_the_previous_layers_channels_last_output_as_it_is() {
    // The fp16 layer output is stored channels-last where C is a multiple of 8 (VGG8 at width 0.125: 16 to 64
    // channels), and the next layer's forward and weight gradient read it with no copy: in a step only the batch's
    // input (1 channel, padded to 8) is copied. That the numbers are right is the VGG8 step parity's to show.
    let spec = model::resolve("vgg8", 1, 32, 10, &ModelOptions { width: 0.125, ..Default::default() }).unwrap();
    let layers = spec.layers.len();
    let params = Params::init(&spec, 5);
    let mut net = Net::new(gpu().with_precision(Precision::F16), spec, &params, AdamW::default(), 2).unwrap();
    let x = randn(2 * 32 * 32, 1.0, 4).iter().map(|v| v.abs()).collect::<Vec<f32>>();
    net.train_step(&x, &[1, 7], 2e-4, 1, Some((0.1, 5))).unwrap();
    assert_eq!(net.backend().inputs_read_as_stored(), 2 * (layers - 1), "convs that read a layer output as stored");
    assert_eq!(net.backend().input_copies_reused(), 1, "the first layer's weight gradient reuses its input's copy");
}

#[test]
#[ignore = "needs a CUDA GPU or the stand-in (ASGE_CUDA_STANDIN=1)"]
fn a_vgg8_training_step_matches_cpu_and_repeats() {
    for precision in PRECISIONS {
        let p = precision.as_str();
        let (cpu_losses, cpu_params, cpu_grads) = vgg8_steps(CpuBackend::new().with_precision(precision), 1);
        let (gpu_losses, gpu_params, gpu_grads) = vgg8_steps(gpu().with_precision(precision), 1);
        // fp16: the goodness sums stored values that may each sit one fp16 ulp apart (module notes).
        let loss_rtol = if precision == Precision::F16 { 1.1e-3 } else { 1e-4 };
        for (l, (a, b)) in cpu_losses[0].iter().zip(&gpu_losses[0]).enumerate() {
            assert!((a - b).abs() <= loss_rtol * a.abs(), "{p} loss {l}: cpu {a} gpu {b}");
        }
        // What the kernels compute is the gradient, and that is what the tolerance argument bounds. In f32 it is
        // the weight-gradient parity's (1e-3 of each value, 1e-4 of the largest: summation order over B*H*W
        // pixels). In fp16 every stored y may sit one ulp (2^-11 relative, 2^-10 above a power of two) from the
        // emulation's, and a layer's input is the previous layer's rounded output, so each term of a dW sum may be
        // off by about 3 ulps relative: 3.3e-3 of each value, 1e-3 of the largest for sums that cancel.
        let (g_rtol, g_atol) = if precision == Precision::F16 { (3.3e-3, 1e-3) } else { (1e-3, 1e-4) };
        for (i, (c, g)) in cpu_grads.iter().zip(&gpu_grads).enumerate() {
            close(&format!("{p} layer {i} dW"), g, c, g_rtol, g_atol);
        }
        // The weights after the step: Adam's first step moves a weight by lr * g / (|g| + eps), about lr = 2e-4
        // times the sign of its gradient whatever its size, so the two sides can differ by up to 2 lr only where the
        // gradients' signs can differ: where |dW| is within the gradient tolerance of zero, |dW| < 2 atol. Outside
        // that band they agree to 10% of a step; the band is excluded and counted.
        let mut excluded = 0;
        for (i, ((c, g), grad)) in cpu_params.layers.iter().zip(&gpu_params.layers).zip(&cpu_grads).enumerate() {
            let band = 2.0 * g_atol * grad.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let mut worst = 0.0f32;
            for ((a, b), d) in c.conv_w.iter().zip(&g.conv_w).zip(grad) {
                if d.abs() < band {
                    excluded += 1;
                } else {
                    worst = worst.max((a - b).abs());
                }
            }
            assert!(worst <= 2e-5, "{p} layer {i}: weights with |dW| >= {band:e} differ by up to {worst} after a step");
        }
        let total: usize = cpu_params.layers.iter().map(|l| l.conv_w.len()).sum();
        println!(
            "{p}: weights compared after one step: {} of {total} ({excluded} in the near-zero-gradient band)",
            total - excluded
        );
        let (l1, p1, _) = vgg8_steps(gpu().with_precision(precision), 3);
        let (l2, p2, _) = vgg8_steps(gpu().with_precision(precision), 3);
        assert_eq!(p1, p2, "{p}: three steps of one seed differ between two runs");
        for (a, b) in l1.iter().flatten().zip(l2.iter().flatten()) {
            assert!((a - b).abs() <= 1e-6 * a.abs(), "{p}: losses differ: {a} vs {b}");
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU or the stand-in (ASGE_CUDA_STANDIN=1)"]
fn layers_on_separate_streams_equal_the_sequential_schedule() {
    // Every kernel is deterministic and cudarc orders the streams by the buffers they share, so one stream per
    // layer must give exactly the numbers of one stream for everything.
    ran_on(&gpu());
    for precision in PRECISIONS {
        let lanes = |n| CudaBackend::with_lanes(0, n).unwrap().with_precision(precision);
        let (l1, p1, _) = vgg8_steps(lanes(1), 3);
        let (l8, p8, _) = vgg8_steps(lanes(8), 3);
        let p = precision.as_str();
        assert_eq!(p1, p8, "{p}: weights after three steps differ between 1 and 8 streams");
        for (a, b) in l1.iter().flatten().zip(l8.iter().flatten()) {
            assert!((a - b).abs() <= 1e-6 * a.abs(), "{p}: losses differ: {a} vs {b}");
        }
    }
}

/// The tests that need the stand-in itself (its launch log, held streams, its exports, its capture rules); in a
/// folder of its own so that it is a module of this test binary, not a binary of its own.
#[path = "cuda/standin.rs"]
mod standin;

#[test]
#[ignore = "needs a CUDA GPU or the stand-in (ASGE_CUDA_STANDIN=1)"]
fn a_replayed_step_graph_leaves_the_channels_last_marks_true() {
    // With one lane the layer boundaries take turns in two buffers, and the batch's input clears the first one's
    // channels-last mark every step, before the graph writes layer outputs into it. A replay runs no host code, so
    // the graph's launch must set the marks its capture recorded again, or the activations read back afterwards
    // come out in the wrong order. Three 16-channel layers on 16x16 maps (VGG8's last boundaries are 1x1 at this
    // size, where both orders agree); fp16, where the layer outputs are stored channels-last.
    let dir = std::env::temp_dir().join(format!("asge-marks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let arch = dir.join("three.json");
    std::fs::write(&arch, r#"{"name": "three", "layers": [{"channels": 16}, {"channels": 16}, {"channels": 16}]}"#)
        .unwrap();
    let spec = model::resolve(arch.to_str().unwrap(), 1, 16, 10, &ModelOptions::default()).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let params = Params::init(&spec, 2);
    let be = || CudaBackend::with_lanes(0, 1).unwrap().with_precision(Precision::F16);
    let mut graphed = Net::new(be(), spec.clone(), &params, AdamW::default(), 4).unwrap();
    let mut eager = Net::new(be().without_step_graphs(), spec.clone(), &params, AdamW::default(), 4).unwrap();
    for t in 1..=5u64 {
        let x: Vec<f32> = randn(4 * 16 * 16, 1.0, 70 + t).iter().map(|v| v.abs()).collect();
        let l = [1, 2, 3, 4];
        assert_eq!(
            graphed.train_step(&x, &l, 1e-3, t, None).unwrap(),
            eager.train_step(&x, &l, 1e-3, t, None).unwrap()
        );
    }
    assert_eq!(graphed.backend().step_graph_counts(), (2, 1), "step 5 was not a replay");
    let layers = spec.layers.len();
    for boundary in layers - 1..=layers {
        let (ga, ea) = (graphed.activation(boundary, 4).unwrap(), eager.activation(boundary, 4).unwrap());
        assert!(ga == ea, "the activation at layer boundary {boundary} after a replayed step");
    }
}

#[test]
#[ignore = "needs a CUDA GPU or the stand-in (ASGE_CUDA_STANDIN=1)"]
fn a_replayed_step_graph_equals_the_eager_steps() {
    // The step graph (src/backend/cuda/graph.rs) against the same steps issued one op at a time, in both
    // precisions: a changing learning rate and dropout key every step (which a graph must read from the device,
    // not from the arguments frozen at capture), two batch shapes (the last partial batch gets its own graphs),
    // then evaluation. The kernels are the same and deterministic, so everything must be equal to the bit; and
    // the graphs must actually have been captured and replayed. With one lane, and with three (the layers' lanes
    // ordered inside the graph by hand-off events, against the eager schedule's per-buffer events; the stand-in
    // replays a graph's independent branches in a random order, so a missing hand-off shows).
    for (precision, lanes) in PRECISIONS.into_iter().flat_map(|p| [(p, 1), (p, 3)]) {
        let spec = model::resolve("vgg8", 1, 16, 10, &ModelOptions { width: 0.125, ..Default::default() }).unwrap();
        let params = Params::init(&spec, 11);
        let b = 8;
        let be = || CudaBackend::with_lanes(0, lanes).unwrap().with_precision(precision);
        let mut graphed = Net::new(be(), spec.clone(), &params, AdamW::default(), b).unwrap();
        let mut eager = Net::new(be().without_step_graphs(), spec.clone(), &params, AdamW::default(), b).unwrap();
        let precision = format!("{precision:?}, {lanes} lane(s)");
        let batch = |t: u64, n: usize| -> (Vec<f32>, Vec<u32>) {
            (
                randn(n * 16 * 16, 1.0, 300 + t).iter().map(|v| v.abs()).collect(),
                (0..n as u32).map(|i| (i + t as u32) % 10).collect(),
            )
        };
        for t in 1..=11u64 {
            // Steps 1-7 at the full batch, 8-11 a partial one; each shape and buffer parity has a warm-up step, a
            // captured one, then replays.
            let n = if t <= 7 { b } else { 6 };
            let (x, l) = batch(t, n);
            let lr = 1e-3 / t as f64;
            let dropout = Some((0.2f32, 0xabc0_0000 + t * 7919));
            let a = graphed.train_step(&x, &l, lr, t, dropout).unwrap();
            let e = eager.train_step(&x, &l, lr, t, dropout).unwrap();
            assert_eq!(a, e, "{precision} step {t}: the graph's statistics differ from the eager step's");
        }
        assert_eq!(graphed.params().unwrap(), eager.params().unwrap(), "{precision}: parameters after 11 steps");
        let (x, l) = batch(99, 5);
        let (ga, ea) = (graphed.eval_logits(&x, &l).unwrap(), eager.eval_logits(&x, &l).unwrap());
        assert_eq!(ga.layers, ea.layers, "{precision}: evaluation after graph steps");
        assert_eq!(ga.fusion, ea.fusion);
        let (captured, replayed) = graphed.backend().step_graph_counts();
        let (ec, er) = eager.backend().step_graph_counts();
        println!("{precision}: {captured} step graphs captured, {replayed} replays; the eager net {ec} and {er}");
        assert!(captured >= 4 && replayed >= 3, "{precision}: {captured} captured, {replayed} replayed");
        assert_eq!((ec, er), (0, 0));
    }
}
