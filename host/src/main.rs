//! The `negcache` command.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use negcache_host::reference;

#[derive(Parser, Debug)]
#[command(name = "negcache", version, about = "Train two-tower retrieval models with a negative cache")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check this build against reference cases.
    ///
    /// Runs every case of each file (or of every *.json file in each
    /// directory) and prints a table: case, kind, pass/fail, largest
    /// deviation. Exits with status 1 when a case fails or is malformed,
    /// and 2 when a file cannot be used at all.
    ///
    /// Example: negcache verify --reference fixtures/reference
    Verify {
        /// Reference-case files or directories of them
        /// (format negcache-reference-v1).
        #[arg(long, num_args = 1.., default_value = "fixtures/reference")]
        reference: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Verify { reference } => verify(&reference),
    }
}

fn verify(paths: &[PathBuf]) -> anyhow::Result<ExitCode> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("{}: cannot list", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "json"))
                .collect();
            found.sort();
            if found.is_empty() {
                anyhow::bail!("{}: no .json reference files in this directory", p.display());
            }
            files.extend(found);
        } else {
            files.push(p.clone());
        }
    }
    let (mut passed, mut failed) = (0usize, 0usize);
    for f in &files {
        let results = reference::run_file(f)?;
        println!("== {}", f.display());
        print!("{}", reference::table(&results));
        let ok = results.iter().filter(|r| r.passed()).count();
        passed += ok;
        failed += results.len() - ok;
    }
    println!("verify: {passed} passed, {failed} failed");
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
