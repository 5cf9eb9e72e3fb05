//! The progress line of long runs (training, evaluation): redrawn in place on a terminal,
//! plain lines otherwise (logs, CI), always on stderr.

use std::io::{IsTerminal, Write};

/// A progress line for `total` units of work.
pub struct Progress {
    tty: bool,
    label: String,
    total: u64,
}

impl Progress {
    /// A progress line labelled `label` ("vae step", "eval frame").
    pub fn new(label: impl Into<String>, total: u64) -> Self {
        Self {
            tty: std::io::stderr().is_terminal(),
            label: label.into(),
            total,
        }
    }

    /// Whether stderr is a terminal (the line is then redrawn in place).
    pub fn is_tty(&self) -> bool {
        self.tty
    }

    /// `LABEL done/total DETAIL RATE UNIT/s ETA XmYYs`; `force_line` ends it with a newline
    /// even on a terminal.
    pub fn show(&self, done: u64, detail: &str, per_s: f64, unit: &str, force_line: bool) {
        let left = self.total.saturating_sub(done);
        let eta = if per_s > 0.0 {
            left as f64 / per_s
        } else {
            0.0
        };
        let eta = format!("{}m{:02}s", (eta / 60.0) as u64, (eta % 60.0) as u64);
        let detail = if detail.is_empty() {
            String::new()
        } else {
            format!(" {detail}")
        };
        let msg = format!(
            "{} {done}/{}{detail} {per_s:.2} {unit}/s ETA {eta}",
            self.label, self.total
        );
        let mut err = std::io::stderr().lock();
        if self.tty && !force_line {
            let _ = write!(err, "\r\x1b[2K{msg}");
        } else {
            if self.tty {
                let _ = write!(err, "\r\x1b[2K");
            }
            let _ = writeln!(err, "{msg}");
        }
        let _ = err.flush();
    }

    /// A message on its own line (clearing a redrawn progress line first).
    pub fn line(&self, msg: &str) {
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K");
        }
        let _ = writeln!(err, "{msg}");
    }
}
