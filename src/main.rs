//! The qfold command line: one file per subcommand under `cli/`.

mod cli;

/// See Cargo.toml: jemalloc keeps large rewrites near linear time.
#[cfg(all(unix, not(target_os = "macos")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    restore_sigpipe();
    std::process::exit(cli::main());
}

/// Rust ignores SIGPIPE, so `println!` to a closed pipe (`qfold inspect --json | head -1`)
/// panics. Restoring the default makes qfold end quietly like any Unix tool when its reader
/// goes away. Reports are printed after the output file is renamed into place, so no
/// temporary file is left behind.
#[cfg(unix)]
fn restore_sigpipe() {
    // SAFETY: called first thing in main, before any thread exists; SIG_DFL is a valid
    // disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

#[cfg(not(unix))]
fn restore_sigpipe() {}
