//! The `asge` command line: thin; it parses, builds a config and calls the library.

use anyhow::{Context, Result};
use asge::backend::Precision;
use asge::data::DatasetKind;
use asge::eval::{self, Strategy};
use asge::files::RunStart;
use asge::model::{GoodnessReduce, PoolKind};
use asge::train::interrupt;
use asge::train::run::{self, AugmentChoice, RunOptions, TrainConfig};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "asge", version, about = "Adaptive Spatial Goodness Encoding: forward-only, layer-local CNN training")]
struct Cli {
    /// Worker threads for the CPU backend and the data loader (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train a model; writes config.json, metrics.jsonl, best/last.safetensors and summary.json to --out.
    Train(Box<TrainArgs>),
    /// Evaluate a checkpoint on a dataset's test file: top-1/top-5 per strategy and per layer.
    Eval(EvalArgs),
    /// Describe this build: backends, threads, the models' shapes.
    Info,
    /// Time every op of a training step and the whole step against ceilings measured on the spot.
    Bench(BenchArgs),
    /// Decode an ImageFolder (one sub-folder of JPEG/PNG images per class) into memory-mappable shards.
    Shard(ShardArgs),
}

#[derive(clap::Args)]
struct ShardArgs {
    /// The ImageFolder: one sub-folder per class.
    #[arg(long)]
    input: PathBuf,
    /// The shard folder (index.json, labels.u16, shard-NNNNN.bin).
    #[arg(long)]
    out: PathBuf,
    /// Side of the stored square images.
    #[arg(long)]
    size: usize,
    #[arg(long, value_enum, default_value = "short-side")]
    resize: asge::data::imagefolder::ResizeMode,
    /// Decoding threads (default: every core).
    #[arg(long)]
    workers: Option<usize>,
    /// Largest shard file, in MiB.
    #[arg(long, default_value_t = 1024)]
    shard_mb: usize,
    #[arg(long)]
    quiet: bool,
}

/// Where a command runs: `--device` and `--precision`, shared by train, eval and bench.
#[derive(clap::Args)]
struct DeviceArgs {
    /// cpu, cuda or cuda:N (ASGE_CUDA_LANES=N puts every layer on its own CUDA stream).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Storage of the conv operands (layer inputs, conv outputs, the weights' compute copy); every sum, the
    /// master weights and the optimizer state stay f32. fp16 runs on the tensor cores on CUDA and is an exact
    /// (slower) emulation on the CPU.
    #[arg(long, value_enum, default_value = "fp32")]
    precision: Precision,
}

#[derive(clap::Args)]
struct BenchArgs {
    #[command(flatten)]
    on: DeviceArgs,
    #[arg(long, default_value = "vgg8")]
    model: String,
    #[arg(long, default_value_t = 1.0)]
    width: f64,
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// Input channels (1: MNIST-like, 3: CIFAR-like).
    #[arg(long, default_value_t = 3)]
    channels: usize,
    #[arg(long, default_value_t = 10)]
    classes: usize,
    /// Timed repetitions per op; the median is reported.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Print JSON instead of the table.
    #[arg(long)]
    json: bool,
    /// Time only the whole training step.
    #[arg(long)]
    step_only: bool,
}

#[derive(clap::Args)]
struct TrainArgs {
    #[arg(long, value_enum)]
    dataset: Option<DatasetKind>,
    /// The dataset's folder of files, or its parent.
    #[arg(long)]
    data: Option<PathBuf>,
    /// vgg8, vgg11, vgg-imagenet, or an architecture JSON file.
    #[arg(long, default_value = "vgg8")]
    model: String,
    /// Channel multiplier (channels rounded to a multiple of 8, at least 8).
    #[arg(long, default_value_t = 1.0)]
    width: f64,
    /// Epochs, and the cosine schedule's length.
    #[arg(long, default_value_t = 100)]
    epochs: usize,
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// Initial learning rate, cosine-annealed per epoch to --lr-min.
    #[arg(long, default_value_t = 2e-4)]
    lr: f64,
    #[arg(long, default_value_t = 1e-5)]
    lr_min: f64,
    #[arg(long, default_value_t = 1e-3)]
    weight_decay: f64,
    /// Seeds every random draw: init, projection, split, order, augmentation, dropout.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    #[command(flatten)]
    on: DeviceArgs,
    /// The run folder.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Keep the first N images of the training file.
    #[arg(long)]
    limit_train: Option<usize>,
    /// Keep the first N images of the test file.
    #[arg(long)]
    limit_test: Option<usize>,
    /// Validation images split from the training file (default: the released split, 1/6 or 1/10; 0: none).
    #[arg(long)]
    val: Option<usize>,
    /// Batches in file order (no per-epoch shuffle).
    #[arg(long)]
    no_shuffle: bool,
    #[arg(long, value_enum, default_value = "default")]
    augment: AugmentChoice,
    #[arg(long, default_value_t = 0.1)]
    dropout: f32,
    /// Start from the weights (and fixed projections) in this safetensors file.
    #[arg(long)]
    init: Option<PathBuf>,
    /// Continue the run in this folder from its last.safetensors (all other options come from its config.json).
    #[arg(long, conflicts_with = "overwrite")]
    resume: Option<PathBuf>,
    /// Replace the run in --out (its config.json, metrics.jsonl, checkpoints, summary.json and curves.svg;
    /// other files stay). Without it, a folder that holds a run is refused.
    #[arg(long)]
    overwrite: bool,
    /// Downsampling pool: avg (released code) or rms (the paper's text).
    #[arg(long, value_enum, default_value = "avg")]
    pool: PoolKind,
    /// Patch goodness: mean of squares (released code) or sum.
    #[arg(long, value_enum, default_value = "mean")]
    goodness: GoodnessReduce,
    /// Patch-grid granularity: P_l = alpha * C_L / C_l.
    #[arg(long, default_value_t = 1.0)]
    alpha: f64,
    /// No progress bar or per-epoch lines.
    #[arg(long)]
    quiet: bool,
    /// Without a terminal (a job log): one progress line every this many seconds (0: after every step).
    #[arg(long, default_value_t = 30.0)]
    log_every: f64,
    /// Also write every step's per-layer losses and accuracy counts to steps.jsonl in the run folder.
    #[arg(long)]
    log_steps: bool,
    /// Stop after this many epochs of the schedule (checkpointed; --resume continues).
    #[arg(long)]
    stop_after: Option<usize>,
    /// Also checkpoint every N steps inside an epoch (an interrupted run then resumes from there).
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// Write a Chrome trace (JSON, opens in Perfetto) of the loader and every layer per batch.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// --dataset imagenet: the side the model sees (random-resized crops for training, centre crops for
    /// evaluation; default: the shards' size).
    #[arg(long)]
    image_size: Option<usize>,
}

#[derive(clap::Args)]
struct EvalArgs {
    #[arg(long)]
    checkpoint: PathBuf,
    /// Default: the dataset the checkpoint was trained on (from its metadata).
    #[arg(long, value_enum)]
    dataset: Option<DatasetKind>,
    /// Default: the data folder the checkpoint was trained from (from its metadata).
    #[arg(long)]
    data: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "all")]
    strategy: Strategy,
    #[arg(long, default_value_t = 256)]
    batch: usize,
    #[arg(long)]
    limit_test: Option<usize>,
    /// Where to write the JSON result (default: <checkpoint>.eval-<dataset>.json beside the checkpoint). An
    /// existing file is replaced only when it is an earlier asge eval result.
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    on: DeviceArgs,
}

fn main() {
    // A panic is a bug in asge, never the user's fault: one line that says so, not Rust's backtrace hint.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        eprintln!("asge: internal error (a bug; please report it): {msg}{at}");
    }));
    let cli = Cli::parse();
    let result = run_cli(cli);
    if let Err(e) = &result {
        // One clear line: the outermost context, then its causes.
        let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
        eprintln!("error: {}", chain.join(": "));
    }
    // After a signal the run has written its checkpoint; the exit code says which signal (130, 143, 129).
    if let Some(sig) = interrupt::received() {
        std::process::exit(interrupt::exit_code(sig));
    }
    if result.is_err() {
        std::process::exit(1);
    }
}

/// The most threads `--threads` and `--workers` may ask for.
const MAX_THREADS: usize = 4096;

fn run_cli(cli: Cli) -> Result<()> {
    if let Some(n) = cli.threads {
        anyhow::ensure!(n > 0, "--threads 0: at least one thread is needed");
        anyhow::ensure!(n <= MAX_THREADS, "--threads {n}: at most {MAX_THREADS}");
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("--threads")?;
    }
    match cli.cmd {
        Cmd::Train(a) => train(*a),
        Cmd::Eval(a) => eval_cmd(a),
        Cmd::Bench(a) => bench(a),
        Cmd::Shard(a) => {
            let o = asge::data::shard::ShardOptions {
                size: a.size,
                resize: a.resize,
                shard_bytes: a.shard_mb.saturating_mul(1 << 20),
                quiet: a.quiet,
            };
            let work = || asge::data::shard::write_shards(&a.input, &a.out, &o).map(|_| ());
            match a.workers {
                Some(0) => anyhow::bail!("--workers 0: at least one worker is needed"),
                Some(n) if n > MAX_THREADS => anyhow::bail!("--workers {n}: at most {MAX_THREADS}"),
                Some(n) => rayon::ThreadPoolBuilder::new().num_threads(n).build().context("--workers")?.install(work),
                None => work(),
            }
        }
        Cmd::Info => {
            info();
            Ok(())
        }
    }
}

fn train(a: TrainArgs) -> Result<()> {
    let opts = RunOptions {
        quiet: a.quiet,
        stop_after: a.stop_after,
        checkpoint_every: a.checkpoint_every,
        stop_at_step: None,
        log_every: Some(a.log_every),
        log_steps: a.log_steps,
    };
    if let Some(path) = &a.trace {
        asge::trace::enable(path);
    }
    run::install_interrupt_handler()?;
    if let Some(dir) = &a.resume {
        let cfg = run::load_run_config(dir)?;
        run::train(&cfg, dir, RunStart::Resume, opts)?;
        return Ok(());
    }
    let dataset = a.dataset.context("--dataset is required (mnist, fashion-mnist, cifar10, cifar100, idx)")?;
    let data = a.data.context("--data DIR is required (the dataset's folder or its parent)")?;
    let out = a.out.context("--out RUN_DIR is required")?;
    let cfg = TrainConfig {
        dataset,
        data,
        model: a.model,
        width: a.width,
        alpha: a.alpha,
        goodness: a.goodness,
        pool: a.pool,
        epochs: a.epochs,
        batch: a.batch,
        lr: a.lr,
        lr_min: a.lr_min,
        weight_decay: a.weight_decay,
        dropout: a.dropout,
        seed: a.seed,
        val: a.val,
        shuffle: !a.no_shuffle,
        augment: a.augment,
        limit_train: a.limit_train,
        limit_test: a.limit_test,
        init: a.init,
        device: a.on.device,
        image_size: a.image_size,
        precision: a.on.precision,
    };
    let start = if a.overwrite { RunStart::Overwrite } else { RunStart::Fresh };
    run::train(&cfg, &out, start, opts)?;
    Ok(())
}

fn eval_cmd(a: EvalArgs) -> Result<()> {
    anyhow::ensure!(a.batch > 0, "--batch 0: the batch needs at least one image");
    let (dataset, data) = match (a.dataset, a.data.clone()) {
        (Some(d), Some(p)) => (d, p),
        (d, p) => {
            // Fill what is missing from the run config stored in the checkpoint.
            let trained = asge::train::checkpoint::load(&a.checkpoint)?
                .config
                .and_then(|c| serde_json::from_value::<TrainConfig>(c.get("train")?.clone()).ok());
            let why =
                || format!("{}: no run config in the metadata; give --dataset and --data", a.checkpoint.display());
            let t = || trained.clone().with_context(why);
            (
                match d {
                    Some(d) => d,
                    None => t()?.dataset,
                },
                match p {
                    Some(p) => p,
                    None => t()?.data,
                },
            )
        }
    };
    let json_path = a.json.unwrap_or_else(|| {
        let stem = a.checkpoint.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        a.checkpoint.with_file_name(format!("{stem}.eval-{}.json", dataset.name()))
    });
    if json_path.symlink_metadata().is_ok() && !is_eval_json(&json_path) {
        anyhow::bail!(
            "--json {}: the file exists and is not an asge eval result; choose another path",
            json_path.display()
        );
    }
    let (rows, res, n_test) = run::eval_checkpoint(
        &a.checkpoint,
        dataset,
        &data,
        a.strategy,
        a.batch,
        a.limit_test,
        &a.on.device,
        a.on.precision,
    )?;
    let title = format!("{} on {} test ({n_test} images)", a.checkpoint.display(), dataset.name());
    println!("{}", eval::format_table(&title, &rows, &res));
    let body = serde_json::json!({
        "format": "asge-eval",
        "checkpoint": a.checkpoint,
        "dataset": dataset.name(),
        "images": n_test,
        "strategies": rows,
        "layer_top1": res.layer_acc(),
        "layer_top5": res.layers.iter().map(|t| t.top5_acc()).collect::<Vec<_>>(),
    });
    asge::files::write_atomic(&json_path, serde_json::to_string_pretty(&body)?.as_bytes())
        .with_context(|| format!("--json {}", json_path.display()))?;
    eprintln!("wrote {}", json_path.display());
    Ok(())
}

/// True for a regular file holding an earlier `asge eval` result (the only kind `eval` replaces).
fn is_eval_json(path: &std::path::Path) -> bool {
    let Ok(meta) = path.symlink_metadata() else { return false };
    meta.is_file()
        && meta.len() < 1 << 24
        && std::fs::read_to_string(path)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .is_some_and(|v| v.get("format").and_then(|f| f.as_str()) == Some("asge-eval"))
}

#[cfg(not(feature = "cuda"))]
fn cuda_info() {
    println!("cuda: not in this build (the `cuda` feature is off)");
}

/// The file the loaded CUDA driver came from and its CUDA version (the stand-in names itself).
#[cfg(feature = "cuda")]
fn driver_library() -> String {
    let mut version = 0;
    // SAFETY: one out-parameter; probe() found the library.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) };
    // The library cudarc loaded: the first of its candidate names already in the process.
    let mut file = "libcuda (path unknown)".to_string();
    for name in cudarc::get_lib_name_candidates("cuda") {
        let Ok(c) = std::ffi::CString::new(name) else { continue };
        // SAFETY: RTLD_NOLOAD only returns a library already loaded; dlsym and dladdr on its handle, closed after.
        unsafe {
            let h = libc::dlopen(c.as_ptr(), libc::RTLD_LAZY | libc::RTLD_NOLOAD);
            if h.is_null() {
                continue;
            }
            let sym = libc::dlsym(h, c"cuInit".as_ptr());
            let mut info: libc::Dl_info = std::mem::zeroed();
            if !sym.is_null() && libc::dladdr(sym, &mut info) != 0 && !info.dli_fname.is_null() {
                file = std::ffi::CStr::from_ptr(info.dli_fname).to_string_lossy().into_owned();
            }
            libc::dlclose(h);
            break;
        }
    }
    let what = if asge::backend::cuda::standin::active() { ", the asge CUDA stand-in (not a GPU)" } else { "" };
    format!("{file}, CUDA {}.{}{what}", version / 1000, (version % 1000) / 10)
}

#[cfg(feature = "cuda")]
fn cuda_info() {
    use asge::backend::cuda::{self, nvrtc};
    let mut archs = vec!["sm_80".to_string(), "sm_90".to_string()];
    match cuda::probe() {
        Ok(n) => {
            println!("cuda driver: {}", driver_library());
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
    if archs.is_empty() {
        // No device: check the kernels for the architectures this project targets (A100, H100/H200).
        println!("no CUDA device: compiling for sm_80 and sm_90");
        archs = vec!["sm_80".into(), "sm_90".into()];
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

fn bench(a: BenchArgs) -> Result<()> {
    anyhow::ensure!(a.batch > 0, "--batch 0: the batch needs at least one image");
    let o = asge::bench::BenchOptions {
        model: a.model,
        width: a.width,
        batch: a.batch,
        channels: a.channels,
        classes: a.classes,
        reps: a.reps,
        step_only: a.step_only,
        precision: a.on.precision,
    };
    let r = match run::device(&a.on.device)? {
        run::Device::Cpu => asge::bench::run_cpu(&o)?,
        #[cfg(feature = "cuda")]
        run::Device::Cuda(n) => asge::bench::run_cuda(asge::backend::cuda::CudaBackend::new(n)?, &o)?,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print!("{}", asge::bench::format_report(&r));
    }
    Ok(())
}

fn info() {
    println!("asge {}", env!("CARGO_PKG_VERSION"));
    println!("cpu: {} threads, f32, im2col + gemm", rayon::current_num_threads());
    cuda_info();
    for (name, ch, classes) in [("vgg8", 1, 10), ("vgg8", 3, 10), ("vgg11", 3, 10), ("vgg11", 3, 100)] {
        if let Ok(spec) = asge::model::resolve(name, ch, 32, classes, &Default::default()) {
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
}
