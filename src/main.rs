//! The qfold command line: one file per subcommand under `cli/`.

mod cli;

fn main() {
    std::process::exit(cli::main());
}
