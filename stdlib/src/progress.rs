//! Progress of long work: a bar on a terminal (indicatif), plain periodic log lines when
//! stderr is not a terminal (CI logs, files).

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A progress reporter for `total` units of work.
pub struct Progress {
    bar: Option<ProgressBar>,
    label: String,
    total: u64,
    state: Mutex<(u64, Instant)>,
}

/// How often plain progress lines are written.
const LINE_EVERY: Duration = Duration::from_secs(10);

impl Progress {
    pub fn new(label: &str, total: u64, unit: &str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let template = format!("{{prefix}} [{{bar:30}}] {{pos}}/{{len}} {unit} {{msg}} ({{elapsed}}, eta {{eta}})");
            if let Ok(style) = ProgressStyle::with_template(&template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_prefix(label.to_string());
            bar
        });
        Self { bar, label: label.to_string(), total, state: Mutex::new((0, Instant::now())) }
    }

    /// One unit done; `message` describes the latest state (e.g. the loss).
    pub fn advance(&self, message: &str) {
        if let Some(bar) = &self.bar {
            bar.set_message(message.to_string());
            bar.inc(1);
            return;
        }
        if let Ok(mut state) = self.state.lock() {
            state.0 += 1;
            if state.1.elapsed() >= LINE_EVERY || state.0 == self.total {
                state.1 = Instant::now();
                tracing::info!(stage = %self.label, done = state.0, total = self.total, status = message, "progress");
            }
        }
    }

    /// Marks `done` units as already done (a resumed stage).
    pub fn skip(&self, done: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(done);
        } else if let Ok(mut state) = self.state.lock() {
            state.0 = done;
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
