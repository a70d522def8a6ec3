//! The qfold command line: one file per subcommand under `cli/`.

mod cli;

/// See Cargo.toml: jemalloc keeps large rewrites near linear time.
#[cfg(all(unix, not(target_os = "macos")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    std::process::exit(cli::main());
}
