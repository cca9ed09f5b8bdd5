//! The `lb` binary: parse, run, map the outcome to an exit code.

use std::process::ExitCode;

use clap::Parser;
use lb::cli::{Cli, Command};
use lb::master::Outcome;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::HelloWorker) => lb::hello::main(),
        None => {
            let config = match lb::config::load(&cli.start, &|k| std::env::var(k).ok()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("lb: error: {e}");
                    return ExitCode::from(2);
                }
            };
            match lb::master::run(config) {
                Ok(Outcome::Drained) => ExitCode::SUCCESS,
                Ok(Outcome::Forced) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("lb: error: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}
