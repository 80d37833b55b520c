//! `asge predict`: the top classes of image files, with their softmax probabilities.

use super::*;

/// One image's prediction: the top classes with their softmax probabilities.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Prediction {
    pub image: PathBuf,
    pub top: Vec<ClassScore>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ClassScore {
    pub class: usize,
    pub name: String,
    pub prob: f64,
    pub logit: f32,
}

pub struct PredictOptions<'a> {
    pub strategy: Option<Strategy>,
    pub top: usize,
    pub batch: usize,
    pub device: &'a str,
    pub precision: Precision,
}

/// The image files `paths` name: files as given, folders walked for .png/.jpg/.jpeg (sorted).
pub fn image_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        let meta = std::fs::metadata(p).with_context(|| format!("{}: no such file or folder", p.display()))?;
        if meta.is_dir() {
            let mut found = Vec::new();
            imagefolder::walk_images(p, &mut found)?;
            if found.is_empty() {
                bail!("{}: no .png, .jpg or .jpeg files in this folder", p.display());
            }
            found.sort();
            out.extend(found);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

/// `asge predict`: the top classes of every image, with the strategy asked for.
/// Returns the strategy that answered, why it did (asked for, or the default's reason), and the predictions.
pub fn predict(path: &Path, images: &[PathBuf], o: &PredictOptions) -> Result<(Strategy, String, Vec<Prediction>)> {
    if o.top == 0 {
        bail!("--top 0: at least one class");
    }
    if o.batch == 0 {
        bail!("--batch 0: the batch needs at least one image");
    }
    let model = Model::open(path)?;
    let (strategy, why) = model.strategy_or_default(o.strategy);
    if strategy == Strategy::All {
        bail!("--strategy all: predict takes one of last, best-layer, fusion");
    }
    model.check_strategy(strategy)?;
    let files = image_files(images)?;
    let ds: Arc<dyn ImageSource> = Arc::new(decode_files(&model.input, &files)?);
    let logits = with_backend!(o.device, o.precision, |make| {
        let be = make()?;
        let spec = &model.spec;
        let batch = o.batch.min(files.len());
        ensure_memory(spec, batch, spec.image_size, be.buffers_on_host(), "prediction")?;
        let mut net = Net::new(be, spec.clone(), &model.params, AdamW::default(), batch)?;
        let mut all = Vec::new();
        let mut sink = |_: &[u32], l: &crate::train::net::EvalLogits| -> Result<()> {
            all.extend_from_slice(eval::strategy_logits(l, strategy, model.best_layer));
            Ok(())
        };
        let display = Display::detect(files.len() <= 256, 30.0);
        eval::evaluate_with(
            &mut net,
            &ds,
            (0..files.len()).collect(),
            model.eval_aug(),
            0,
            Some((display, "predict")),
            &mut sink,
        )?;
        Ok::<_, anyhow::Error>(all)
    })?;
    let classes = model.spec.classes;
    let preds = files
        .into_iter()
        .zip(logits.chunks_exact(classes))
        .map(|(image, row)| {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
            let z: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
            let mut order: Vec<usize> = (0..classes).collect();
            // Highest first; ties to the lower index, as argmax.
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            let top = order
                .into_iter()
                .take(o.top.min(classes))
                .map(|c| ClassScore {
                    class: c,
                    name: model.input.class_names[c].clone(),
                    prob: (row[c] as f64 - max).exp() / z,
                    logit: row[c],
                })
                .collect();
            Prediction { image, top }
        })
        .collect();
    Ok((strategy, why, preds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_strategy_is_the_higher_validation_accuracy() {
        let state = |fusion: Option<f64>, layers: Vec<f64>, best: usize| TrainState {
            best_val: fusion,
            best_layer_acc: layers,
            best_layer: best,
            ..Default::default()
        };
        // The quickstart's case: the best layer beats fusion.
        let s = state(Some(0.9765), vec![0.90, 0.9844, 0.97], 1);
        let (strategy, why) = default_strategy(3, Some(&s));
        assert_eq!(strategy, Strategy::Best);
        assert!(why.contains("layer 2 98.44%, fusion 97.65%"), "{why}");
        // Fusion ahead, and on a tie.
        assert_eq!(default_strategy(3, Some(&state(Some(0.98), vec![0.9, 0.97, 0.96], 1))).0, Strategy::Fusion);
        assert_eq!(default_strategy(3, Some(&state(Some(0.97), vec![0.9, 0.97, 0.96], 1))).0, Strategy::Fusion);
        // No validation recorded (no state, or a run without a validation set): fusion, said to be the fallback.
        for st in [None, Some(state(None, vec![0.9, 0.99, 0.9], 1))] {
            let (strategy, why) = default_strategy(3, st.as_ref());
            assert_eq!(strategy, Strategy::Fusion);
            assert!(why.contains("fallback"), "{why}");
        }
        // One layer: last, whatever the state says.
        assert_eq!(default_strategy(1, Some(&state(Some(0.5), vec![0.6], 0))).0, Strategy::Last);
    }
}
