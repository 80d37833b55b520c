//! `asge info`: the build, the CPU, the CUDA driver and devices, NVRTC and each kernel's compile for the
//! devices' architectures (with ptxas' resource report), and the built-in models' sizes.

#[cfg(feature = "cuda")]
use anyhow::Context;
use anyhow::Result;

/// Prints the report; with `self_test`, first the tensor-core self-test on every CUDA device.
pub fn print(self_test: bool) -> Result<()> {
    println!("asge {}", env!("CARGO_PKG_VERSION"));
    println!("cpu: {} threads, f32, im2col + gemm", rayon::current_num_threads());
    // The self-test first: seconds, where the compile and ptxas report below can take longer.
    if self_test {
        self_test_cuda()?;
    }
    cuda_info();
    for (name, ch, classes) in [("vgg8", 1, 10), ("vgg8", 3, 10), ("vgg11", 3, 10), ("vgg11", 3, 100)] {
        if let Ok(spec) = crate::model::resolve(name, ch, 32, classes, &Default::default()) {
            println!(
                "{name:>6} {ch}x32x32 N={classes:<3}: {} conv layers, conv params {}, heads {}, D = {:?}, {:.2} GMAC/image forward",
                spec.layers.len(),
                spec.conv_params(),
                spec.head_params(),
                spec.goodness_dims(),
                spec.conv_macs() as f64 / 1e9
            );
        }
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn self_test_cuda() -> Result<()> {
    anyhow::bail!("--self-test: this build has no CUDA backend (build with the `cuda` feature)")
}

/// `asge info --self-test`: the tensor-core self-test on every device, one line each.
#[cfg(feature = "cuda")]
fn self_test_cuda() -> Result<()> {
    use crate::backend::cuda::{self, selftest, CudaBackend};
    let n = cuda::probe().context("--self-test")?;
    let mut failed = 0;
    for i in 0..n {
        let be = CudaBackend::new(i).with_context(|| format!("--self-test: cuda:{i}"))?;
        let r = selftest::run(&be, false).with_context(|| format!("--self-test: cuda:{i}"))?;
        println!("self-test cuda:{i} ({}): {}", be.device_name(), r.verdict());
        failed += !r.passed() as usize;
    }
    anyhow::ensure!(failed == 0, "--self-test: {failed} of {n} CUDA devices failed the tensor-core self-test");
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn cuda_info() {
    println!("cuda: not in this build (the `cuda` feature is off)");
}

#[cfg(feature = "cuda")]
fn cuda_info() {
    use crate::backend::cuda::{self, nvrtc};
    // The architectures this project targets (A100, H100/H200), and every device's own.
    let mut archs = vec!["sm_80".to_string(), "sm_90".to_string()];
    match cuda::probe() {
        Ok(n) => {
            println!("cuda driver: {}", cuda::driver_library());
            for i in 0..n {
                match cudarc::driver::CudaContext::new(i) {
                    Ok(ctx) => {
                        let (ma, mi) = ctx.compute_capability().unwrap_or((0, 0));
                        println!("cuda:{i}: {} (sm_{ma}{mi})", ctx.name().unwrap_or_default());
                        archs.push(format!("sm_{ma}{mi}"));
                    }
                    Err(e) => println!("cuda:{i}: cannot open ({e:?})"),
                }
            }
        }
        Err(e) => println!("cuda: unavailable: {e:#}"),
    }
    // Only runs of several ranks need it (asge comm-check; one GPU never does).
    println!("nccl: {}", crate::dist::nccl::describe());
    if !nvrtc::available() {
        println!("nvrtc: unavailable (libnvrtc.so.13 not on the loader path): kernels not compiled");
        return;
    }
    let v = nvrtc::version().unwrap_or(0);
    let lib = nvrtc::library_path().map(|(name, path)| format!("{name} -> {path}")).unwrap_or_default();
    println!("nvrtc: {}.{} ({lib})", v / 1000, (v % 1000) / 10);
    if let Err(e) = nvrtc::check_library() {
        println!("nvrtc: NOT USABLE: {e:#}");
    }
    archs.sort();
    archs.dedup();
    for arch in archs {
        for (module, r) in nvrtc::compile_all(&arch) {
            match r {
                Ok(()) => println!("kernel {module:<22} {arch}: ok"),
                Err(e) => println!(
                    "kernel {module:<22} {arch}: FAILED {}",
                    format!("{e:#}").lines().take(3).collect::<Vec<_>>().join(" | ")
                ),
            }
        }
        // ptxas' report for the device's architecture: registers per thread, spills, local stack, static shared
        // memory.
        match nvrtc::resources(&arch) {
            Ok(r) => {
                for k in r {
                    println!(
                        "  {:<26} {arch}: {:>3} registers, {:>5} B shared, {} B spilled, {} B stack",
                        k.kernel, k.registers, k.shared_bytes, k.spill_bytes, k.stack_bytes
                    );
                }
            }
            Err(e) => println!("  ptxas report for {arch}: {}", format!("{e:#}").lines().next().unwrap_or_default()),
        }
    }
}
