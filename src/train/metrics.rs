//! What a run records per epoch (`metrics.jsonl`), read back by the plot and the TensorBoard writer.

use serde::{Deserialize, Serialize};

/// Per-epoch metrics, one JSON line in `metrics.jsonl`. The fusion fields are absent for a one-layer model
/// (it has no fusion heads).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub lr: f64,
    pub train_layer_loss: Vec<f64>,
    pub train_layer_acc: Vec<f64>,
    pub train_fusion_loss: Option<f64>,
    pub train_fusion_acc: Option<f64>,
    pub val_layer_acc: Option<Vec<f64>>,
    pub val_fusion_acc: Option<f64>,
    /// Validation cross-entropy per layer (through its projection) and of the fusion heads.
    #[serde(default)]
    pub val_layer_loss: Option<Vec<f64>>,
    #[serde(default)]
    pub val_fusion_loss: Option<f64>,
    pub images_per_s: f64,
    pub seconds: f64,
    /// When the epoch ended: seconds since the Unix epoch (what TensorBoard's wall time is).
    #[serde(default)]
    pub wall_time: f64,
}
