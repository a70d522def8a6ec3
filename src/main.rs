//! The qfold command line: one file per subcommand under `cli/`.

mod cli;

/// See Cargo.toml: jemalloc keeps large rewrites near linear time.
#[cfg(all(unix, not(target_os = "macos")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read when it starts: transparent huge pages for its memory and its
/// metadata. A rewrite allocates hundreds of megabytes of fresh tensors (the weights decoded
/// from the file, the folded weights, the output); with 4 KiB pages, faulting them in was over
/// half of `qfold fuse`'s time on resnet50 (0.27 s, against 0.12 s with huge pages, `cp` of the
/// file 0.08 s). The kernel only grants them where transparent huge pages are enabled
/// (`always` or `madvise`); `_RJEM_MALLOC_CONF` in the environment still overrides this.
#[cfg(all(unix, not(target_os = "macos")))]
#[export_name = "_rjem_malloc_conf"]
pub static MALLOC_CONF: &[u8; 31] = b"thp:always,metadata_thp:always\0";

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
