//! Progress display: indicatif bars on a terminal, plain periodic lines (on stderr, so the
//! report on stdout stays clean) otherwise, nothing with --quiet.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

const LINE_EVERY: Duration = Duration::from_secs(1);

pub enum Progress {
    Off,
    Bar(Option<ProgressBar>),
    Lines {
        stage: String,
        len: u64,
        unit: String,
        last: Option<Instant>,
        /// Latest line not printed because of the rate limit, shown when the stage ends.
        pending: Option<String>,
    },
}

impl Progress {
    pub fn new(quiet: bool) -> Progress {
        if quiet {
            Progress::Off
        } else if std::io::stdout().is_terminal() {
            Progress::Bar(None)
        } else {
            Progress::Lines {
                stage: String::new(),
                len: 0,
                unit: String::new(),
                last: None,
                pending: None,
            }
        }
    }

    /// Starts a stage whose progress runs from 0 to `len` (`unit` names it).
    pub fn stage(&mut self, name: &str, len: u64, unit: &str) {
        match self {
            Progress::Off => {}
            Progress::Bar(bar) => {
                if let Some(b) = bar.take() {
                    b.finish_and_clear();
                }
                let style = ProgressStyle::with_template(&format!(
                    "{{prefix:>7}} [{{bar:20.cyan/blue}}] {{pos}}/{{len}} {unit} {{wide_msg}}"
                ))
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
                let b = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stdout())
                    .with_style(style)
                    .with_prefix(name.to_string());
                b.enable_steady_tick(Duration::from_millis(200));
                *bar = Some(b);
            }
            Progress::Lines {
                stage,
                len: l,
                unit: u,
                last,
                pending,
            } => {
                if let Some(line) = pending.take() {
                    eprintln!("{line}");
                }
                *stage = name.to_string();
                *l = len;
                *u = unit.to_string();
                *last = None;
            }
        }
    }

    pub fn update(&mut self, pos: u64, msg: impl FnOnce() -> String) {
        match self {
            Progress::Off => {}
            Progress::Bar(Some(b)) => {
                b.set_position(pos);
                b.set_message(msg());
            }
            Progress::Bar(None) => {}
            Progress::Lines {
                stage,
                len,
                unit,
                last,
                pending,
            } => {
                let line = format!("[{stage}] {pos}/{len} {unit} {}", msg());
                if last.is_none_or(|t| t.elapsed() >= LINE_EVERY) {
                    *last = Some(Instant::now());
                    *pending = None;
                    eprintln!("{line}");
                } else {
                    *pending = Some(line);
                }
            }
        }
    }

    /// A one-off note (warnings), shown above any bar.
    pub fn note(&self, text: &str) {
        match self {
            Progress::Off => {}
            Progress::Bar(Some(b)) => b.println(text),
            _ => eprintln!("{text}"),
        }
    }

    pub fn finish(&mut self) {
        match self {
            Progress::Bar(bar) => {
                if let Some(b) = bar.take() {
                    b.finish_and_clear();
                }
            }
            Progress::Lines { pending, .. } => {
                if let Some(line) = pending.take() {
                    eprintln!("{line}");
                }
            }
            Progress::Off => {}
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}
