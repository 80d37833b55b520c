//! Training: the layer step written once against the backend ([`net`]), the schedule, checkpoints,
//! metrics and the run loop ([`run`]).

pub mod checkpoint;
pub mod config;
pub mod interrupt;
pub mod metrics;
pub mod net;
pub mod plot;
pub mod progress;
pub mod resume;
pub mod run;
pub mod schedule;
pub mod sources;
pub mod tensorboard;

pub use net::{AdamW, Net, StepStats};
