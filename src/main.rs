//! `uwsgi-it-operator`: one binary, one subcommand per program.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    version,
    about = "uwsgi.it hosting on Kubernetes: controller, node agent and CRDs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write the CustomResourceDefinitions generated from the Rust types.
    Crds {
        /// Directory to write one YAML file per CRD into; prints them to stdout when omitted.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crds { out } => write_crds(out),
    }
}

fn write_crds(out: Option<PathBuf>) -> anyhow::Result<()> {
    let manifests = uwsgi_it_api::crd_manifests().context("rendering the CRDs")?;
    match out {
        None => {
            for manifest in manifests {
                print!("---\n{}", manifest.yaml);
            }
        }
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for manifest in manifests {
                let path = dir.join(&manifest.file_name);
                std::fs::write(&path, manifest.yaml)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
    }
    Ok(())
}
