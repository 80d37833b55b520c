//! Writes the CUBIN of every `kernels/*.cu` module for one architecture, compiled by NVRTC exactly as the CUDA
//! backend compiles it (no GPU needed): `cargo run --release --example dump_cubin -- OUT_DIR [sm_90]`.
//! `tools/sass-stats.sh` disassembles them and counts what the GEMM kernels' main loops execute.
//!
//! With `--cache DIR [sm_90]` it fills a kernel cache instead (`ASGE_KERNEL_CACHE=DIR`): every module as PTX and
//! as CUBIN under the names the backend looks up, so that a GPU machine without NVRTC loads the very CUBIN whose
//! SASS CI checks (`tools/gpu-check.sh build`).

use asge::backend::cuda::nvrtc;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1).peekable();
    let cache = args.next_if(|a| a == "--cache").is_some();
    let usage = || anyhow::anyhow!("usage: dump_cubin [--cache] OUT_DIR [ARCH]");
    let out = std::path::PathBuf::from(args.next().ok_or_else(usage)?);
    let arch = args.next().unwrap_or_else(|| "sm_90".into());
    std::fs::create_dir_all(&out)?;
    for (module, source, hash) in nvrtc::KERNELS {
        if cache {
            for format in [nvrtc::Format::Ptx, nvrtc::Format::Cubin] {
                nvrtc::compile_cached_in(Some(&out), module, source, *hash, &arch, format)?;
            }
        } else {
            std::fs::write(out.join(format!("{module}.cubin")), nvrtc::compile_cubin(module, source, &arch)?)?;
        }
    }
    Ok(())
}
