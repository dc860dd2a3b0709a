//! `cloudlet base ...`

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use cloudlet_base::{
    build_base, default_cache, export_base, import_base, BaseStore, BuildOptions, Recipe,
};

use crate::Output;

#[derive(Subcommand)]
pub enum BaseCommand {
    /// Build a base VM (`tiny` or `debian`) from Debian packages.
    Build {
        recipe: String,
        /// Store it under another name.
        #[arg(long)]
        name: Option<String>,
        /// Guest memory in MiB (default: 256 for tiny, 512 for debian).
        #[arg(long)]
        memory_mib: Option<u64>,
        /// Rebuild even if the inputs are unchanged.
        #[arg(long)]
        force: bool,
    },
    /// List the base VMs this cloudlet holds.
    List,
    /// Show one base VM's manifest.
    Show { name: String },
    /// Check a base VM's files against its hashes.
    Verify { name: String },
    /// Write a base VM to one checksummed file.
    Export { name: String, file: PathBuf },
    /// Read a base VM from an exported file.
    Import {
        file: PathBuf,
        #[arg(long)]
        name: Option<String>,
    },
    /// Delete a base VM.
    Delete { name: String },
}

pub async fn run(cmd: BaseCommand, home: &Path, output: Output) -> anyhow::Result<()> {
    let store = BaseStore::new(home);
    match cmd {
        BaseCommand::Build {
            recipe,
            name,
            memory_mib,
            force,
        } => {
            let recipe: Recipe = recipe.parse()?;
            let opts = BuildOptions {
                name,
                memory_mib,
                force,
                cache_dir: default_cache(),
                agent: None,
            };
            let start = std::time::Instant::now();
            let m = build_base(&store, recipe, &opts)
                .await
                .with_context(|| format!("Building base {}", recipe.as_str()))?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&m)?),
                Output::Text => println!(
                    "base {} ready: id {} ({:.1} s)",
                    m.name,
                    &m.id[..16],
                    start.elapsed().as_secs_f64()
                ),
            }
        }
        BaseCommand::List => {
            let list = store.list()?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&list)?),
                Output::Text => {
                    println!(
                        "{:<12} {:<18} {:>8} {:>10} {:>6}",
                        "NAME", "ID", "MEMORY", "DISK", "ACCEL"
                    );
                    for m in list {
                        println!(
                            "{:<12} {:<18} {:>6}Mi {:>8}Mi {:>6}",
                            m.name,
                            &m.id[..16],
                            m.machine.memory_mib,
                            m.disk_size >> 20,
                            m.accel.as_str()
                        );
                    }
                }
            }
        }
        BaseCommand::Show { name } => {
            let b = store.get(&name)?;
            println!("{}", serde_json::to_string_pretty(&b.manifest)?);
        }
        BaseCommand::Verify { name } => {
            let b = store.get(&name)?;
            b.verify()?;
            println!("base {name}: all files match id {}", b.manifest.id);
        }
        BaseCommand::Export { name, file } => {
            let size = export_base(&store, &name, &file)
                .with_context(|| format!("Exporting base {name}"))?;
            println!("exported {name} to {} ({} MiB)", file.display(), size >> 20);
        }
        BaseCommand::Import { file, name } => {
            let m = import_base(&store, &file, name.as_deref())
                .with_context(|| format!("Importing {}", file.display()))?;
            println!("imported base {} (id {})", m.name, &m.id[..16]);
        }
        BaseCommand::Delete { name } => {
            store.delete(&name)?;
            println!("deleted base {name}");
        }
    }
    Ok(())
}
