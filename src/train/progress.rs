//! Progress of a long pass (an epoch, a validation or test pass): a redrawn bar on a terminal, or, when stderr is
//! not a terminal (a job log), one plain line every `--log-every` seconds, so that a log shows life. Both carry
//! the pass's ETA and, for training, the whole run's.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Display {
    /// Nothing (`--quiet`).
    Off,
    /// An indicatif bar on stderr (a terminal).
    Bar,
    /// A plain line at most every this many seconds (0: after every step).
    Lines(f64),
}

impl Display {
    /// The bar on a terminal, plain lines every `log_every` seconds otherwise, nothing when `quiet`.
    pub fn detect(quiet: bool, log_every: f64) -> Self {
        if quiet {
            Display::Off
        } else if std::io::stderr().is_terminal() {
            Display::Bar
        } else {
            Display::Lines(log_every.max(0.0))
        }
    }
}

/// `1:02:03` or `2:03`.
pub fn hms(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return "?".into();
    }
    let s = seconds.round() as u64;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

/// One pass of `total` steps, starting at `start` (a resumed epoch), with `later` more passes of the same length
/// to come (the run's remaining epochs) for the run's ETA.
pub struct Progress {
    display: Display,
    bar: Option<ProgressBar>,
    label: String,
    total: u64,
    start: u64,
    pos: u64,
    later: u64,
    t0: Instant,
    last_line: Option<Instant>,
}

impl Progress {
    pub fn new(display: Display, label: impl Into<String>, total: u64, start: u64, later: u64) -> Self {
        let label = label.into();
        let bar = (display == Display::Bar).then(|| {
            let pb = ProgressBar::new(total);
            pb.set_style(
                ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {elapsed_precise} {msg}")
                    .expect("a valid template")
                    .progress_chars("=> "),
            );
            pb.set_prefix(label.clone());
            pb.set_position(start);
            // Redrawn on a timer, not only when a step ends (a width-1 step on a CPU takes seconds).
            pb.enable_steady_tick(Duration::from_millis(500));
            pb
        });
        Progress { display, bar, label, total, start, pos: start, later, t0: Instant::now(), last_line: None }
    }

    /// Seconds left in this pass and in the run, from the rate so far.
    pub fn eta(&self) -> Option<(f64, f64)> {
        let done = self.pos.saturating_sub(self.start);
        let elapsed = self.t0.elapsed().as_secs_f64();
        if done == 0 || elapsed <= 0.0 {
            return None;
        }
        let per_step = elapsed / done as f64;
        let pass = (self.total - self.pos.min(self.total)) as f64 * per_step;
        Some((pass, pass + (self.later * self.total) as f64 * per_step))
    }

    fn eta_text(&self) -> String {
        match self.eta() {
            Some((pass, run)) if self.later > 0 => format!("eta {} (run {})", hms(pass), hms(run)),
            Some((pass, _)) => format!("eta {}", hms(pass)),
            None => "eta ?".into(),
        }
    }

    /// Moves to step `pos` with a status message.
    pub fn set(&mut self, pos: u64, msg: &str) {
        self.pos = pos;
        match self.display {
            Display::Off => {}
            Display::Bar => {
                if let Some(b) = &self.bar {
                    b.set_position(pos);
                    b.set_message(format!("{}  {msg}", self.eta_text()));
                }
            }
            Display::Lines(every) => {
                let due = self.last_line.is_none_or(|t| t.elapsed().as_secs_f64() >= every) || pos == self.total;
                if due {
                    self.last_line = Some(Instant::now());
                    eprintln!("asge: {} step {pos}/{}  {}  {msg}", self.label, self.total, self.eta_text());
                }
            }
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

/// A line for the user on stderr, unless `quiet`.
pub fn say(quiet: bool, msg: impl AsRef<str>) {
    if !quiet {
        eprintln!("{}", msg.as_ref());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_clock_times() {
        assert_eq!(hms(0.0), "0:00");
        assert_eq!(hms(125.4), "2:05");
        assert_eq!(hms(3.0 * 3600.0 + 61.0), "3:01:01");
        assert_eq!(hms(f64::NAN), "?");
    }

    #[test]
    fn the_eta_extrapolates_the_rate_to_the_pass_and_the_run() {
        let mut p = Progress::new(Display::Off, "epoch 1/3", 100, 0, 2);
        assert!(p.eta().is_none());
        std::thread::sleep(Duration::from_millis(20));
        p.set(10, "");
        let (pass, run) = p.eta().unwrap();
        // 90 steps left in this pass, 290 in the run, at the same rate.
        assert!((run / pass - 290.0 / 90.0).abs() < 1e-9, "{pass} {run}");
    }
}
