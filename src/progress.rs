//! Progress of the phases that can take more than a second (load, fuse, calibrate, evaluate,
//! convert, save), on stderr.
//!
//! The library is silent unless told otherwise ([`set_verbosity`]); the CLI sets
//! [`Verbosity::Normal`] (`-q` quiet, `-v` verbose). At `Normal`, a phase shows a spinner (or a
//! bar, for counted work) on a terminal once it has lasted a second, and prints one line as it
//! starts otherwise, so CI logs show what is running. At `Verbose`, every phase also prints a
//! line with its duration when it ends, terminal or not.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

/// How much qfold says on stderr while it works.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verbosity {
    /// Nothing but errors (the library's default, and `-q`).
    Quiet = 0,
    /// Progress of long phases.
    Normal = 1,
    /// Also each phase's duration, and notes meant for debugging.
    Verbose = 2,
}

static LEVEL: AtomicU8 = AtomicU8::new(Verbosity::Quiet as u8);

/// Sets how much qfold prints on stderr, for the whole process.
pub fn set_verbosity(v: Verbosity) {
    LEVEL.store(v as u8, Ordering::Relaxed);
}

/// The current verbosity.
pub fn verbosity() -> Verbosity {
    match LEVEL.load(Ordering::Relaxed) {
        0 => Verbosity::Quiet,
        1 => Verbosity::Normal,
        _ => Verbosity::Verbose,
    }
}

/// Prints a note for the user on stderr (unless quiet): something qfold did that they
/// should know about (a cast, a default taken).
pub fn note(msg: impl AsRef<str>) {
    if verbosity() >= Verbosity::Normal {
        eprintln!("note: {}", msg.as_ref());
    }
}

/// Prints a line on stderr only when verbose.
pub fn detail(msg: impl AsRef<str>) {
    if verbosity() >= Verbosity::Verbose {
        eprintln!("qfold: {}", msg.as_ref());
    }
}

/// A phase of work in progress; ends when dropped.
pub struct Phase {
    what: String,
    start: Instant,
    bar: indicatif::ProgressBar,
    shown: bool,
    level: Verbosity,
}

/// A phase that shows a spinner on a terminal (see the module docs).
pub fn phase(what: impl Into<String>) -> Phase {
    start(what.into(), None)
}

/// A phase of `total` steps that shows a bar; call [`Phase::inc`] per step.
pub fn counted(what: impl Into<String>, total: usize) -> Phase {
    start(what.into(), Some(total as u64))
}

fn start(what: String, total: Option<u64>) -> Phase {
    let level = verbosity();
    let terminal = std::io::stderr().is_terminal();
    if level >= Verbosity::Normal && !terminal {
        eprintln!("qfold: {what}");
    }
    let bar = match total {
        Some(n) => {
            let b = indicatif::ProgressBar::with_draw_target(
                Some(n),
                indicatif::ProgressDrawTarget::hidden(),
            );
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} {bar:30} {pos}/{len} {elapsed}/{eta}",
                )
                .expect("valid template"),
            );
            b
        }
        None => {
            let b = indicatif::ProgressBar::hidden();
            b.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {msg} {elapsed}")
                    .expect("valid template"),
            );
            b
        }
    };
    bar.set_message(what.clone());
    let mut p = Phase {
        what,
        start: Instant::now(),
        bar,
        shown: false,
        level,
    };
    if level >= Verbosity::Normal && terminal && total.is_none() {
        // A spinner ticks by itself (a phase shorter than a tick never draws); a bar
        // appears once it has lasted a second (see `show`).
        p.bar
            .set_draw_target(indicatif::ProgressDrawTarget::stderr());
        p.bar.enable_steady_tick(Duration::from_millis(120));
        p.shown = true;
    }
    p
}

impl Phase {
    /// One more step of a counted phase.
    pub fn inc(&mut self) {
        self.bar.inc(1);
        self.show();
    }

    fn show(&mut self) {
        if !self.shown
            && self.level >= Verbosity::Normal
            && self.start.elapsed() > Duration::from_secs(1)
        {
            self.bar
                .set_draw_target(indicatif::ProgressDrawTarget::stderr());
            self.shown = true;
        }
    }

    /// How long the phase has run.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

impl Drop for Phase {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
        if self.level >= Verbosity::Verbose {
            eprintln!(
                "qfold: {}: {:.2} s",
                self.what,
                self.start.elapsed().as_secs_f64()
            );
        }
    }
}
