//! Writes the CUBIN of every `kernels/*.cu` module for one architecture, compiled by NVRTC exactly as the CUDA
//! backend compiles it (no GPU needed): `cargo run --release --example dump_cubin -- OUT_DIR [sm_90]`.
//! `tools/sass-stats.sh` disassembles them and counts what the GEMM kernels' main loops execute.

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let out = std::path::PathBuf::from(args.next().ok_or_else(|| anyhow::anyhow!("usage: dump_cubin OUT_DIR [ARCH]"))?);
    let arch = args.next().unwrap_or_else(|| "sm_90".into());
    std::fs::create_dir_all(&out)?;
    for (module, source, _) in asge::backend::cuda::nvrtc::KERNELS {
        let cubin = asge::backend::cuda::nvrtc::compile_cubin(module, source, &arch)?;
        std::fs::write(out.join(format!("{module}.cubin")), cubin)?;
    }
    Ok(())
}
