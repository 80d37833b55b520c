//! The `asge` command line: thin; it parses, builds a config and calls the library.

use anyhow::{Context, Result};
use asge::backend::Precision;
use asge::data::DatasetKind;
use asge::eval::{self, Strategy};
use asge::files::RunStart;
use asge::train::config::{self, TrainConfig};
use asge::train::interrupt;
use asge::train::run::{self, RunOptions};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
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
    #[command(override_usage = "asge train --dataset DATASET --data DIR --out RUN [OPTIONS]\n       \
                                asge train --config FILE --out RUN [OPTIONS]\n       \
                                asge train --resume RUN [--epochs N] [--device D] [--precision P] [--data DIR]")]
    Train(Box<TrainArgs>),
    /// Evaluate a checkpoint on a dataset's test file, a shard folder or an ImageFolder: top-1/top-5 per strategy
    /// and per layer.
    Eval(EvalArgs),
    /// Classify image files with a checkpoint: the top classes and their probabilities.
    #[command(override_usage = "asge predict --checkpoint FILE IMAGE|FOLDER... [--strategy S] [--top K] [--json]")]
    Predict(PredictArgs),
    /// Export a checkpoint: an ONNX graph of one prediction strategy (opset 17), or weights-only safetensors.
    #[command(override_usage = "asge export --checkpoint FILE --format onnx|safetensors [--strategy S] --out FILE")]
    Export(ExportArgs),
    /// Describe this build: backends, threads, the models' shapes.
    Info(InfoArgs),
    /// Time every op of a training step and the whole step against ceilings measured on the spot.
    Bench(BenchArgs),
    /// Decode an ImageFolder (one sub-folder of JPEG/PNG images per class) into memory-mappable shards.
    Shard(ShardArgs),
    /// Check NCCL between the ranks a launcher started (torchrun, Slurm's srun, mpirun, or --nproc N here), or
    /// alone: exact all-reduce results at a few sizes, and the all-reduce's bus bandwidth.
    #[command(name = "comm-check")]
    CommCheck(CommCheckArgs),
}

#[derive(clap::Args)]
struct CommCheckArgs {
    /// Start N ranks on this machine (one GPU each: LOCAL_RANK picks it), as torchrun --nproc-per-node would.
    #[arg(long, value_name = "N")]
    nproc: Option<usize>,
    /// Values (f32) per checked all-reduce, comma-separated.
    #[arg(long, value_name = "N,...", value_delimiter = ',', default_value = "1000,1000000")]
    sizes: Vec<usize>,
    /// Timed all-reduces at the largest size.
    #[arg(long, value_name = "N", default_value_t = 20)]
    iters: usize,
    /// Where the ranks meet: tcp:HOST:PORT (rank 0 listens) or file:PATH (on a file system every rank sees).
    /// Default: MASTER_ADDR:MASTER_PORT, or under torchrun a file in the temporary folder (one machine).
    #[arg(long, value_name = "WHERE")]
    rendezvous: Option<String>,
    /// Seconds a rank waits for the others (the rendezvous, each collective) before it fails.
    #[arg(long, value_name = "SECONDS", default_value_t = asge::dist::DEFAULT_TIMEOUT_S)]
    timeout: u64,
}

/// How image files are read: shared by shard, eval and predict.
#[derive(clap::Args)]
struct ImageArgs {
    /// Images of more pixels than this are not decoded (a decompression bomb stops here; Pillow's default bound).
    #[arg(long, value_name = "N", default_value_t = asge::data::imagefolder::DEFAULT_MAX_PIXELS)]
    max_image_pixels: u64,
}

impl ImageArgs {
    /// Sets the decode bound of every image the command reads.
    fn apply(&self) -> Result<()> {
        let n = self.max_image_pixels;
        anyhow::ensure!(n > 0, "--max-image-pixels 0: no image could be decoded; give a number of pixels");
        asge::data::imagefolder::set_max_pixels(n);
        Ok(())
    }
}

#[derive(clap::Args)]
struct InfoArgs {
    /// Also run the tensor-core self-test on every CUDA device (seconds: cp.async, ldmatrix, ldmatrix.trans and
    /// mma.sync on known inputs, compared value by value); exits 1 when a device fails it.
    #[arg(long)]
    self_test: bool,
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
    /// How an image becomes S x S: its short side resized to S and the centre cropped (torchvision's
    /// Resize + CenterCrop), or both sides resized to S (the aspect ratio changes).
    #[arg(long, value_enum, default_value = "short-side")]
    resize: asge::data::imagefolder::ResizeMode,
    /// Decoding threads (default: every core).
    #[arg(long)]
    workers: Option<usize>,
    /// Largest shard file, in MiB.
    #[arg(long, default_value_t = 1024)]
    shard_mb: usize,
    #[command(flatten)]
    decode: ImageArgs,
    /// No progress bar and no summary line (errors still print).
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
    /// The model whose layer shapes are timed: vgg8, vgg11, vgg-imagenet, or an architecture JSON file.
    #[arg(long, default_value = "vgg8")]
    model: String,
    /// Channel multiplier, as train's --width.
    #[arg(long, default_value_t = 1.0)]
    width: f64,
    /// Images per step.
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// Input channels (1: MNIST-like, 3: CIFAR-like).
    #[arg(long, default_value_t = 3)]
    channels: usize,
    /// Classes (the projections' and the heads' outputs).
    #[arg(long, default_value_t = 10)]
    classes: usize,
    /// Timed repetitions per op; the median is reported.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// On a GPU: the training steps the step time is measured over with the device's events (back to back, as
    /// training runs them).
    #[arg(long, value_name = "N", default_value_t = 20)]
    step_reps: usize,
    /// On a GPU: after the step's time, this many eager steps with every kernel timed alone (CUDA events around
    /// each launch, which then runs with nothing beside it): the kernel table, by layer, with each kernel's FLOPs,
    /// bytes and achieved rate. 0 leaves it out.
    #[arg(long, value_name = "N", default_value_t = 3)]
    kernel_steps: usize,
    /// Print JSON instead of the table.
    #[arg(long)]
    json: bool,
    /// Also write the report as JSON to this file (an earlier bench report there is replaced; any other file is
    /// an error).
    #[arg(long, value_name = "FILE")]
    save: Option<PathBuf>,
    /// Time only the whole training step.
    #[arg(long)]
    step_only: bool,
}

#[derive(clap::Args)]
struct TrainArgs {
    /// Every option that defines the run (see the headings below).
    #[command(flatten)]
    cfg: TrainConfig,
    /// Read the run's options from this JSON or TOML file (the keys of config.json; a run's own config.json
    /// works); the options given on the command line override it.
    #[arg(long, value_name = "FILE", help_heading = "Run folder")]
    config: Option<PathBuf>,
    /// The run folder: config.json, metrics.jsonl, best/last.safetensors, summary.json (required for a new run).
    #[arg(long, value_name = "RUN", help_heading = "Run folder")]
    out: Option<PathBuf>,
    /// Continue the run in this folder from its last.safetensors, with its options; only --epochs (extending
    /// or shortening the schedule), --device, --precision and --data may be given, and the output options.
    #[arg(long, value_name = "RUN", conflicts_with_all = ["overwrite", "config"], help_heading = "Run folder")]
    resume: Option<PathBuf>,
    /// Replace the run in --out (its config.json, metrics, checkpoints, summary and curves; other files stay).
    /// Without it, a folder that holds a run is refused.
    #[arg(long, help_heading = "Run folder")]
    overwrite: bool,
    /// Stop after this many epochs of the schedule (checkpointed; --resume continues).
    #[arg(long, value_name = "N", help_heading = "Checkpointing")]
    stop_after: Option<usize>,
    /// Also checkpoint every N steps inside an epoch (an interrupted run then resumes from there).
    #[arg(long, value_name = "STEPS", help_heading = "Checkpointing")]
    checkpoint_every: Option<u64>,
    /// No progress bar or per-epoch lines.
    #[arg(long, help_heading = "Output")]
    quiet: bool,
    /// Without a terminal (a job log): one progress line every this many seconds (0: after every step).
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0, help_heading = "Output")]
    log_every: f64,
    /// Also write every step's per-layer losses and accuracy counts to steps.jsonl in the run folder.
    #[arg(long, help_heading = "Output")]
    log_steps: bool,
    /// TensorBoard: every this many steps, a point of each layer's and the fusion heads' training loss (their
    /// mean since the last point) and of the lr, on the step axis (the `steps/` charts; 0: none, only the
    /// per-epoch curves). The run's options always go to TensorBoard's HParams table.
    #[arg(long, value_name = "STEPS", default_value_t = asge::train::run::DEFAULT_TB_EVERY, help_heading = "Output")]
    tb_every: u64,
    /// Write a Chrome trace (JSON, opens in Perfetto) of the loader and every layer per batch.
    #[arg(long, value_name = "FILE", help_heading = "Output")]
    trace: Option<PathBuf>,
    /// Start N ranks on this machine, one GPU each (LOCAL_RANK picks it), as torchrun --nproc-per-node would;
    /// --batch stays the global batch (docs/many-gpus.md).
    #[arg(long, value_name = "N", help_heading = "Many GPUs")]
    nproc: Option<usize>,
    /// How the ranks share the work: data (each rank trains on its share of every batch) or layers (each rank
    /// trains contiguous layers, pipelined across steps; the numbers of one process bit for bit).
    #[arg(long, value_name = "MODE", default_value = "data", value_parser = ["data", "layers"], help_heading = "Many GPUs")]
    parallel: String,
    /// With --parallel layers: the layers before each rank's first, for ranks 1, 2, ... (2,5: rank 0 trains
    /// layers 1-2, rank 1 layers 3-5, rank 2 the rest). Default: the split that balances the layers' arithmetic.
    #[arg(long, value_name = "B1,B2,...", value_delimiter = ',', help_heading = "Many GPUs")]
    placement: Option<Vec<usize>>,
    /// Where the ranks meet: tcp:HOST:PORT (rank 0 listens) or file:PATH (on a file system every rank sees).
    /// Default: MASTER_ADDR:MASTER_PORT, or under torchrun a file in the temporary folder (one machine).
    #[arg(long, value_name = "WHERE", help_heading = "Many GPUs")]
    rendezvous: Option<String>,
    /// Seconds a rank waits for the others (the rendezvous, each collective) before it fails; more than the
    /// longest pause of rank 0 (writing a checkpoint).
    #[arg(long, value_name = "SECONDS", default_value_t = asge::dist::DEFAULT_TIMEOUT_S, help_heading = "Many GPUs")]
    timeout: u64,
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("what").args(["dataset", "folder"])))]
struct EvalArgs {
    /// The checkpoint (a run's best.safetensors or last.safetensors, or an exported weights file).
    #[arg(long, value_name = "FILE")]
    checkpoint: PathBuf,
    /// A built-in dataset's test file (default: the dataset the checkpoint was trained on, from its metadata).
    #[arg(long, value_enum)]
    dataset: Option<DatasetKind>,
    /// The dataset's folder (default: the folder the checkpoint was trained from, from its metadata).
    #[arg(long, value_name = "DIR", conflicts_with = "folder")]
    data: Option<PathBuf>,
    /// Evaluate on this folder instead: a shard folder (asge shard's output, with index.json) or an ImageFolder
    /// (one sub-folder of PNG/JPEG images per class, named as the checkpoint's classes).
    #[arg(long, value_name = "DIR")]
    folder: Option<PathBuf>,
    /// The predictions to report (all: last, best-layer and fusion; `best` is accepted for best-layer).
    #[arg(long, value_enum, default_value = "all")]
    strategy: Strategy,
    /// Images per forward pass.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Evaluate the first N images only.
    #[arg(long, value_name = "N")]
    limit_test: Option<usize>,
    /// Where to write the JSON result, in summary.json's schema (default: <checkpoint>.eval-<dataset>.json beside
    /// the checkpoint). An existing file is replaced only when it is an earlier asge eval result.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Also write every image's logits (last, best, fusion) and label to this safetensors file, to compare an
    /// exported model with.
    #[arg(long, value_name = "FILE")]
    dump_logits: Option<PathBuf>,
    /// With --dump-logits: add the images as the model saw them ([N, C, S, S] in [0, 1], before the RMS norm).
    #[arg(long, requires = "dump_logits")]
    dump_inputs: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    decode: ImageArgs,
    #[command(flatten)]
    on: DeviceArgs,
}

#[derive(clap::Args)]
struct PredictArgs {
    /// The checkpoint (a run's best.safetensors or last.safetensors, or an exported weights file).
    #[arg(long, value_name = "FILE")]
    checkpoint: PathBuf,
    /// Image files (PNG, JPEG) or folders of them (walked recursively).
    #[arg(value_name = "IMAGE|FOLDER", required = true)]
    images: Vec<PathBuf>,
    /// The prediction: the last layer's, the best layer's on validation (best-layer; `best` is accepted), or the
    /// fusion heads' [default: whichever of fusion and the best layer had the higher validation accuracy at the
    /// checkpoint's epoch; fusion when the checkpoint records none; last for a one-layer model].
    #[arg(long, value_enum)]
    strategy: Option<eval::OneStrategy>,
    /// How many classes to show per image.
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Print JSON (one object per image) instead of the table.
    #[arg(long)]
    json: bool,
    /// Images per forward pass.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    #[command(flatten)]
    decode: ImageArgs,
    #[command(flatten)]
    on: DeviceArgs,
}

#[derive(clap::Args)]
struct ExportArgs {
    /// The checkpoint to export.
    #[arg(long, value_name = "FILE")]
    checkpoint: PathBuf,
    /// onnx: the inference graph of one strategy; safetensors: the model's weights without optimizer state.
    #[arg(long, value_enum)]
    format: asge::export::Format,
    /// ONNX only: the prediction the graph computes (the default as `asge predict`'s: the higher validation
    /// accuracy of fusion and the best layer). The graph holds only the layers it reads.
    #[arg(long, value_enum)]
    strategy: Option<eval::OneStrategy>,
    /// The file to write (an existing file is replaced only when it is an earlier export of the same format).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
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
        // A reader that closed the pipe (`asge info | head`): not a bug; end quietly, as other tools do, with the
        // shell's status for SIGPIPE. Every command writes its files before it prints (none is lost).
        if msg.starts_with("failed printing to std") && msg.contains("Broken pipe") {
            std::process::exit(141);
        }
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        eprintln!("asge: internal error (a bug; please report it): {msg}{at}");
    }));
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let result = run_cli(cli, &matches);
    if let Err(e) = &result {
        // One clear line: the outermost context, then its causes.
        let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
        // A rank of a launcher says which (only rank 0 prints progress; every rank prints its errors).
        let rank = match asge::dist::World::from_env() {
            Ok(Some(w)) if !chain.iter().any(|c| c.starts_with("rank ")) => w.prefix(),
            _ => String::new(),
        };
        eprintln!("error: {rank}{}", chain.join(": "));
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

fn run_cli(cli: Cli, matches: &clap::ArgMatches) -> Result<()> {
    if let Some(n) = cli.threads {
        anyhow::ensure!(n > 0, "--threads 0: at least one thread is needed");
        anyhow::ensure!(n <= MAX_THREADS, "--threads {n}: at most {MAX_THREADS}");
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("--threads")?;
    } else if let Ok(Some(w)) = asge::dist::World::from_env() {
        // The ranks of one machine share its cores (torchrun's OMP_NUM_THREADS=1 is not rayon's).
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        let n = (cores / w.local_size.max(1)).max(1);
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("--threads")?;
    }
    match cli.cmd {
        Cmd::Train(a) => {
            train(*a, matches.subcommand_matches("train").expect("the train subcommand's matches"), cli.threads)
        }
        Cmd::Eval(a) => {
            a.decode.apply()?;
            eval_cmd(a)
        }
        Cmd::Predict(a) => {
            a.decode.apply()?;
            predict_cmd(a)
        }
        Cmd::Export(a) => {
            println!("{}", asge::export::export(&a.checkpoint, a.format, a.strategy.map(Into::into), &a.out)?);
            Ok(())
        }
        Cmd::Bench(a) => bench(a),
        Cmd::Shard(a) => {
            a.decode.apply()?;
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
        Cmd::Info(a) => asge::info::print(a.self_test),
        Cmd::CommCheck(a) => comm_check(a, cli.threads),
    }
}

/// `--nproc N`: starts the N ranks of this command line on this machine and exits with the first failing one's code.
fn launch_ranks(n: usize, threads: Option<usize>) -> Result<()> {
    let args = asge::dist::launch::args_without(&["--nproc", "--threads"]);
    let code = asge::dist::launch::run(n, &args, threads)?;
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}

fn comm_check(a: CommCheckArgs, threads: Option<usize>) -> Result<()> {
    anyhow::ensure!(a.timeout > 0, "--timeout 0: give the seconds a rank waits for the others");
    anyhow::ensure!(!a.sizes.is_empty() && a.sizes.iter().all(|&n| n > 0), "--sizes: counts of at least 1");
    anyhow::ensure!(a.sizes.iter().all(|&n| n <= 1 << 28), "--sizes: at most {} values (1 GiB)", 1 << 28);
    if let Some(n) = a.nproc {
        return launch_ranks(n, threads);
    }
    #[cfg(feature = "cuda")]
    {
        let o = asge::dist::check::CheckOptions {
            sizes: a.sizes,
            iters: a.iters,
            rendezvous: a.rendezvous,
            timeout: std::time::Duration::from_secs(a.timeout),
        };
        asge::dist::check::run(&o)
    }
    #[cfg(not(feature = "cuda"))]
    anyhow::bail!("asge comm-check: this build has no CUDA backend (built without the `cuda` feature)")
}

fn train(a: TrainArgs, m: &clap::ArgMatches, threads: Option<usize>) -> Result<()> {
    anyhow::ensure!(a.timeout > 0, "--timeout 0: give the seconds a rank waits for the others");
    // Also in the --nproc launcher, which forwards the signals to its ranks.
    run::install_interrupt_handler()?;
    if let Some(n) = a.nproc {
        return launch_ranks(n, threads);
    }
    let parallel = match (a.parallel.as_str(), &a.placement) {
        ("layers", p) => asge::dist::layers::Parallel::Layers(p.clone()),
        (_, Some(_)) => anyhow::bail!("--placement places layers on ranks: it needs --parallel layers"),
        _ => asge::dist::layers::Parallel::Data,
    };
    asge::dist::layers::set_parallel(parallel);
    let world = asge::dist::World::from_env()?;
    let opts = RunOptions {
        // Only rank 0 prints progress.
        quiet: a.quiet || world.as_ref().is_some_and(|w| w.rank != 0),
        stop_after: a.stop_after,
        checkpoint_every: a.checkpoint_every,
        stop_at_step: None,
        log_every: Some(a.log_every),
        log_steps: a.log_steps,
        tb_every: Some(a.tb_every),
    };
    if let Some(path) = &a.trace {
        asge::trace::enable(path);
    }
    if let Some(dir) = &a.resume {
        if a.out.as_ref().is_some_and(|o| o != dir) {
            anyhow::bail!("--out with --resume: a resumed run stays in its folder ({})", dir.display());
        }
        config::check_resumable(dir, m)?;
        let cfg = config::for_resume(run::load_run_config(dir)?, &a.cfg, m)?;
        return train_ranks(&cfg, dir, RunStart::Resume, opts, world.as_ref(), &a);
    }
    let file = config::new_run_file(a.config.as_deref(), m)?;
    let out = a.out.clone().context("--out RUN is required (the run folder)")?;
    let cfg = config::merge(file, &a.cfg, m)?.with_absolute_paths()?;
    let start = if a.overwrite { RunStart::Overwrite } else { RunStart::Fresh };
    train_ranks(&cfg, &out, start, opts, world.as_ref(), &a)
}

/// Trains in this process: alone, or as one rank of `world` (data or layer parallel over NCCL: docs/many-gpus.md).
fn train_ranks(
    cfg: &TrainConfig,
    out: &std::path::Path,
    start: RunStart,
    opts: RunOptions,
    world: Option<&asge::dist::World>,
    a: &TrainArgs,
) -> Result<()> {
    let Some(w) = world else {
        run::train(cfg, out, start, opts)?;
        return Ok(());
    };
    if !cfg.device.starts_with("cuda") {
        anyhow::bail!(
            "--device {}: {} started {} ranks, and several ranks train on GPUs only (--device cuda; each rank uses \
             cuda:LOCAL_RANK)",
            cfg.device,
            w.launcher.name(),
            w.size
        );
    }
    if a.trace.is_some() {
        anyhow::bail!("--trace with {} ranks: not supported yet; trace a run of one process", w.size);
    }
    #[cfg(feature = "cuda")]
    {
        let timeout = std::time::Duration::from_secs(a.timeout);
        asge::dist::group::join(w, a.rendezvous.as_deref(), timeout)?;
        let r = run::train(cfg, out, start, opts);
        asge::dist::group::leave();
        r?;
        Ok(())
    }
    #[cfg(not(feature = "cuda"))]
    anyhow::bail!("{} ranks: this build has no CUDA backend (built without the `cuda` feature)", w.size)
}

fn eval_cmd(a: EvalArgs) -> Result<()> {
    use asge::infer::{self, Dump, EvalData, EvalOptions, Model};
    // Read once: its run config fills --dataset and --data, then it is evaluated.
    asge::files::note_input(&a.checkpoint);
    let ck = asge::train::checkpoint::load(&a.checkpoint)?;
    let data = EvalData::choose(&a.checkpoint, &ck, a.folder.clone(), a.dataset, a.data.clone())?;
    let json_path = a.json.clone().unwrap_or_else(|| data.default_json_path(&a.checkpoint));
    let json_out =
        asge::files::Output { path: &json_path, flag: "--json", kind: "an asge eval result", ours: &is_eval_json };
    json_out.check()?;
    if let Some(d) = &a.dump_logits {
        asge::files::distinct_outputs(&[("--json", &json_path), ("--dump-logits", d)])?;
    }
    let o = EvalOptions {
        strategy: a.strategy,
        batch: a.batch,
        limit: a.limit_test,
        device: &a.on.device,
        precision: a.on.precision,
        dump: a.dump_logits.clone().map(|path| Dump { path, inputs: a.dump_inputs }),
        quiet: a.quiet,
    };
    let model = Model::from_checkpoint(&a.checkpoint, ck)?;
    let (report, res) = infer::eval(&model, &data, &o)?;
    let title = data.title(&a.checkpoint, &report);
    // The JSON first: a closed stdout (`| head`) loses no file.
    json_out.write(serde_json::to_string_pretty(&report)?.as_bytes())?;
    println!("{}", eval::format_table(&title, &report.test, &res));
    eprintln!("wrote {}", json_path.display());
    Ok(())
}

fn predict_cmd(a: PredictArgs) -> Result<()> {
    use asge::infer::{self, PredictOptions};
    let o = PredictOptions {
        strategy: a.strategy.map(Into::into),
        top: a.top,
        batch: a.batch,
        device: &a.on.device,
        precision: a.on.precision,
    };
    let (strategy, why, preds) = infer::predict(&a.checkpoint, &a.images, &o)?;
    let answered = format!("strategy {} ({why})", strategy.label());
    if a.json {
        // The JSON lines stay one object per image: which strategy answered goes to the log.
        eprintln!("asge predict: {answered}");
        for p in &preds {
            println!("{}", serde_json::to_string(p)?);
        }
        return Ok(());
    }
    let names: Vec<String> = preds.iter().map(|p| p.image.display().to_string()).collect();
    let w = names.iter().map(|n| n.chars().count()).max().unwrap_or(5).clamp(5, 60);
    let k = preds.first().map_or(0, |p| p.top.len());
    println!("{}: {answered}; the top {k} classes by probability", a.checkpoint.display());
    for (name, p) in names.iter().zip(&preds) {
        let cells: Vec<String> =
            p.top.iter().map(|c| format!("{} {:.1}%", printable(&c.name), 100.0 * c.prob)).collect();
        println!("{:<w$}  {}", printable(name), cells.join("   "));
    }
    Ok(())
}

/// `s` for a terminal: control characters (an escape sequence in a class or file name would drive the terminal)
/// shown escaped, as `\u{1b}`.
fn printable(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
}

/// True for a regular file holding an earlier `asge eval` result (the only kind `eval` replaces).
fn is_eval_json(path: &std::path::Path) -> bool {
    asge::files::json_format_is(path, "asge-eval")
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
        step_reps: a.step_reps,
        step_only: a.step_only,
        kernel_steps: a.kernel_steps,
        precision: a.on.precision,
    };
    let is_bench_json = |p: &std::path::Path| asge::files::json_format_is(p, "asge-bench");
    let save = a.save.as_deref().map(|path| asge::files::Output {
        path,
        flag: "--save",
        kind: "an asge bench report",
        ours: &is_bench_json,
    });
    if let Some(out) = &save {
        out.check()?;
    }
    let r = match asge::backend::select::device(&a.on.device)? {
        asge::backend::select::Choice::Cpu => asge::bench::run_cpu(&o)?,
        #[cfg(feature = "cuda")]
        asge::backend::select::Choice::Cuda(n) => asge::bench::run_cuda(asge::backend::cuda::CudaBackend::new(n)?, &o)?,
    };
    if let Some(out) = &save {
        out.write(format!("{}\n", serde_json::to_string_pretty(&r)?).as_bytes())?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print!("{}", asge::bench::format_report(&r));
    }
    Ok(())
}
