//! The `trainmetrics` command: `validate --config FILE` checks a pipeline config and lists every
//! problem at once.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use trainmetrics::config::PipelineConfig;

#[derive(Parser)]
#[command(name = "trainmetrics", version, about = "OpenTelemetry pipeline for ML training metrics")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check a config file; prints every problem and exits non-zero if there is one.
    Validate {
        /// YAML config file.
        #[arg(long)]
        config: PathBuf,
    },
}

fn validate(path: &std::path::Path) -> anyhow::Result<()> {
    let config = PipelineConfig::from_yaml_file(path)?;
    let settings = config.validate()?;
    println!("{}: valid, {} exporter(s)", path.display(), settings.exporters.len());
    for e in &settings.exporters {
        println!("  {}: every_steps {:?}, interval {:?}", e.name, e.delivery.cadence.every_steps, e.delivery.cadence.interval);
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Validate { config } => validate(config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
