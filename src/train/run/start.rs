//! [`Run::start`]: the options checked, the data and the model loaded, the run folder taken, and the model and
//! its optimizer state built or restored (a resumed run's from its checkpoint).

use super::*;
use crate::dist::layers::Parallel;

impl<'c, B: Backend> Run<'c, B> {
    /// Checks the options, loads the data and the model, takes the run folder, and builds (or, resuming,
    /// restores) the model and its optimizer state. Nothing in the folder changes until all of that succeeded.
    pub fn start(
        cfg: &'c TrainConfig,
        out: &Path,
        start: RunStart,
        opts: RunOptions,
        make_backend: &impl Fn() -> Result<B>,
    ) -> Result<Self> {
        cfg.validate()?;
        opts.validate()?;
        // One of several ranks (data parallel): only rank 0 takes the run folder and writes to it.
        let (rank, ranks) = crate::dist::place();
        let lead = rank == 0;
        let parallel = crate::dist::layers::parallel();
        let layer_parallel = ranks > 1 && matches!(parallel, Parallel::Layers(_));
        if ranks > 1 && !layer_parallel && !cfg.batch.is_multiple_of(ranks) {
            bail!(
                "--batch {}: the global batch is split evenly over the {ranks} ranks, so it must be a multiple of {ranks} \
                 (the nearest: {} or {})",
                cfg.batch,
                cfg.batch / ranks * ranks,
                cfg.batch.div_ceil(ranks) * ranks
            );
        }
        if start != RunStart::Resume && lead {
            // Refuse an occupied folder before loading anything.
            RunFolder::check(out, start)?;
        }
        // A resumed run keeps its layer table and knows the options it ran with.
        let stored = if start == RunStart::Resume { Some(load_run_file(out)?) } else { None };
        let (sources, spec) = prepare_with(cfg, stored.as_ref().and_then(|s| s.1.clone()))?;
        // The in-memory readers applied the limits already; the shards apply them here (the first N records).
        let n = sources.train.len().min(cfg.limit_train.unwrap_or(usize::MAX));
        let n_test = sources.test.len().min(cfg.limit_test.unwrap_or(usize::MAX));
        let val = match cfg.val {
            Some(v) => v,
            // Runs record the split they resolved; a shard run that recorded none is from before shards had a
            // default validation split, when they had none.
            None if start == RunStart::Resume && cfg.dataset == DatasetKind::Shards => 0,
            None => cfg.dataset.default_val(n),
        };
        let (train_idx, val_idx) = data::split(n, val, cfg.seed)?;
        if cfg.early_stop.is_some() && val_idx.is_empty() {
            bail!(
                "--early-stop needs a validation set to watch, and this run has none (--val, or more training images)"
            );
        }
        // A batch larger than the training set runs as one smaller batch (as PyTorch's DataLoader does), and the
        // workspace is sized for the images that exist.
        let batch = cfg.batch.min(train_idx.len());
        if ranks > 1 && !layer_parallel {
            let (n, last) = (train_idx.len(), train_idx.len() % batch.max(1));
            if batch < ranks || (last > 0 && last < ranks) {
                bail!(
                    "{} training images in batches of {batch}: the last batch of an epoch has {} image(s), fewer than \
                     the {ranks} ranks that share it; choose another --batch or --limit-train",
                    n,
                    if batch < ranks { batch } else { last }
                );
            }
        }
        // Each rank's workspace holds its share of a batch (data parallel), or the batch.
        let local_batch = if layer_parallel { batch } else { batch.div_ceil(ranks) };
        let bounds = match parallel {
            Parallel::Layers(manual) if layer_parallel => {
                Some(crate::dist::layers::placement(&spec, ranks, manual.as_deref())?)
            }
            _ => None,
        };
        // `--trace` may name neither an input (the data, noted as it was opened; --init) nor one of the run's own
        // files.
        if let Some(init) = cfg.init.as_ref().filter(|_| start != RunStart::Resume) {
            files::note_input(init);
        }
        if let Some(t) = crate::trace::path() {
            files::outside_run_files("--trace", &t, out)?;
            crate::trace::check()?;
        }
        let be = make_backend()?;
        ensure_memory(&spec, local_batch, sources.input_size, be.buffers_on_host(), "training")?;
        if be.ranks() != ranks {
            bail!("--device {}: {ranks} ranks need a backend with their communicator (--device cuda)", cfg.device);
        }

        let folder = if lead { Some(RunFolder::open(out, start)?) } else { None };
        // The other ranks read the folder (to resume, and the best checkpoint for the final test): on one machine,
        // or on a file system every machine sees.
        let dir = folder.as_ref().map_or_else(|| out.to_path_buf(), |f| f.dir.clone());
        let resume_from = if start == RunStart::Resume { resume_point(&dir, &spec, opts.quiet)? } else { None };
        let identity = data_identity(cfg.dataset, &sources);
        if let (Some(from), Some(stored)) = (&resume_from, &stored) {
            check_resume(from, stored, &identity, &cfg.data, train_idx.len().div_ceil(batch), opts.quiet)?;
        }
        let (params, state, ckpt) = if let Some((path, ck, state)) = resume_from {
            (ck.params_for(&path, &spec)?, state, Some((path, ck)))
        } else if let Some(init) = &cfg.init {
            let ck = checkpoint::load(init).with_context(|| format!("--init {}", init.display()))?;
            (ck.params_for(init, &spec)?, TrainState::default(), None)
        } else {
            (Params::init(&spec, cfg.seed), TrainState::default(), None)
        };
        let adamw = AdamW { weight_decay: cfg.weight_decay, ..AdamW::default() };
        let mut net = Net::new(be, spec.clone(), &params, adamw, local_batch)?;
        if let Some(b) = &bounds {
            net.set_stage(crate::dist::layers::stage(b, rank))?;
        }
        if let Some((path, ck)) = &ckpt {
            ck.restore_optimizer(path, &mut net)?;
        }
        let mut resolved = cfg.clone();
        resolved.val = Some(val);
        let config_json =
            serde_json::json!({ "train": resolved, "model": spec, "input": sources.input, "data": identity });
        // The checkpoints this run will write must load: one is checked now, before any training, with the reader's
        // own checks (a run must never end with checkpoints that --resume, eval, predict and export refuse).
        let first = dir.join("last.safetensors");
        checkpoint::check_readable(&checkpoint::encode(&first, &net, &state, &config_json)?, &first)
            .context("this run's checkpoints would not load; nothing was trained")?;
        if let Some(folder) = &folder {
            folder.clear_old_run()?;
        }
        if start == RunStart::Resume {
            if state.epochs_done > cfg.epochs {
                bail!("--epochs {}: the run has already trained {} epochs", cfg.epochs, state.epochs_done);
            }
            if state.batches_done > 0 && state.epochs_done >= cfg.epochs {
                bail!(
                    "--epochs {}: the checkpoint is inside epoch {} (its batches would be dropped); give --epochs {} or more",
                    cfg.epochs,
                    state.epochs_done + 1,
                    state.epochs_done + 1
                );
            }
            if lead {
                truncate_metrics(&dir.join("metrics.jsonl"), state.epochs_done)?;
                truncate_steps(&dir.join("steps.jsonl"), state.step)?;
            }
            // The options it continues with (--epochs, --device, --precision, --data may have changed).
            let (old, _) = stored.as_ref().expect("a resumed run's stored config");
            if old != &resolved && lead {
                files::write_atomic(&dir.join("config.json"), serde_json::to_string_pretty(&config_json)?.as_bytes())?;
            }
            if old.epochs != cfg.epochs && state.epochs_done < cfg.epochs {
                let e = state.epochs_done;
                say(
                    opts,
                    format!(
                        "asge: --epochs {} (was {}): the cosine schedule now spans {} epochs; epoch {}'s lr is {:.4e} (was {:.4e})",
                        cfg.epochs,
                        old.epochs,
                        cfg.epochs,
                        e + 1,
                        cosine_lr(cfg.lr, cfg.lr_min, e, cfg.epochs),
                        cosine_lr(old.lr, old.lr_min, e, old.epochs)
                    ),
                );
            }
        } else if lead {
            files::write_atomic(&dir.join("config.json"), serde_json::to_string_pretty(&config_json)?.as_bytes())?;
            files::write_atomic(&dir.join("metrics.jsonl"), b"")?;
        }
        say(
            opts,
            format!(
                "asge: {} on {} ({} train / {} val / {} test), {} layers, {:.2}M trainable params, {} epochs, batch {}{}, {}{}",
                spec.arch,
                cfg.dataset.name(),
                train_idx.len(),
                val_idx.len(),
                n_test,
                spec.layers.len(),
                (spec.conv_params() + spec.head_params()) as f64 / 1e6,
                cfg.epochs,
                batch,
                if batch < cfg.batch { format!(" (--batch {} is more than the training set)", cfg.batch) } else { String::new() },
                net.backend().name(),
                if let Some(b) = &bounds {
                    format!(", {}", crate::dist::layers::describe(&spec, b))
                } else if ranks > 1 {
                    format!(", {ranks} ranks data-parallel ({} images each a step)", local_batch)
                } else {
                    String::new()
                }
            ),
        );
        // A run far too short for its lr trains to near chance and looks broken: say so before it starts.
        let mut init_std: Vec<f64> = spec.layers.iter().map(|l| (2.0 / (9 * l.c_in) as f64).sqrt()).collect();
        init_std.sort_by(f64::total_cmp);
        let steps_per_epoch = train_idx.len().div_ceil(batch.max(1));
        if let Some(w) = crate::train::schedule::short_run_warning(
            cfg.lr,
            cfg.lr_min,
            cfg.epochs,
            steps_per_epoch,
            init_std[init_std.len() / 2],
        ) {
            if lead {
                eprintln!("{w}");
            }
        }
        let events = if lead {
            let mut events = crate::train::tensorboard::EventWriter::create(&dir)?;
            // The run's options as its row of TensorBoard's HParams table.
            events.hparams_start(&config_json["train"], "", wall_time_now())?;
            Some(events)
        } else {
            None
        };
        say(
            opts,
            format!("asge: run folder {} (tensorboard --logdir {} shows its curves)", dir.display(), dir.display()),
        );
        if start == RunStart::Resume {
            let per_epoch = train_idx.len().div_ceil(batch);
            say(
                opts,
                format!(
                    "asge: resuming at epoch {} of {}, {} (optimizer step {})",
                    state.epochs_done + 1,
                    cfg.epochs,
                    if state.batches_done >= per_epoch {
                        "its validation (its training is complete)".to_string()
                    } else {
                        format!("step {} of {per_epoch}", state.batches_done + 1)
                    },
                    state.step
                ),
            );
        }
        if ranks > 1 {
            // Every rank read its own data, checkpoint and options: they must start at the same place with the same
            // weights, or their collectives would not pair up.
            let records = u64::from_str_radix(&identity.records, 16).unwrap_or(0);
            let facts: [(&str, u64); 9] = [
                ("the optimizer step", state.step),
                ("the epochs done", state.epochs_done as u64),
                ("the batches done in the epoch", state.batches_done as u64),
                ("the training images", train_idx.len() as u64),
                ("the validation images", val_idx.len() as u64),
                ("the test images", n_test as u64),
                ("the batch", batch as u64),
                ("the data's records (hash, high half)", records >> 32),
                ("the data's records (hash, low half)", records & 0xffff_ffff),
            ];
            let mine: Vec<f64> = facts.iter().flat_map(|&(_, v)| [v as f64, -(v as f64)]).collect();
            let mut all = mine.clone();
            net.backend().all_reduce_host(&mut all, crate::backend::Reduction::Max)?;
            for (i, (what, v)) in facts.iter().enumerate() {
                if all[2 * i] != mine[2 * i] || all[2 * i + 1] != mine[2 * i + 1] {
                    bail!(
                        "the {ranks} ranks do not start alike: {what} is {v} here, from {} to {} across the ranks (every \
                         rank must see the same data and the same run folder)",
                        -all[2 * i + 1],
                        all[2 * i]
                    );
                }
            }
            super::same_weights_on_every_rank(&net, rank, "at the start")?;
        }
        Ok(Run {
            cfg,
            opts,
            folder,
            dir,
            rank,
            ranks,
            sources,
            spec,
            net,
            state,
            train_idx,
            val_idx,
            n_test,
            batch,
            config_json,
            adamw,
            train_seconds: 0.0,
            train_images: 0,
            events,
            tb_steps: StepLosses::default(),
        })
    }
}
