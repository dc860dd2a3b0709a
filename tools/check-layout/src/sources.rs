//! The workspace's Rust sources, read once and handed to every check.
//!
//! Every `.rs` file under the root is read, except in `target/` folders
//! and hidden ones (`.git`). Paths are kept relative to the root, with `/`
//! between components, so that reports and the baseline read the same on
//! every machine.

use std::fs;
use std::path::Path;

use anyhow::Context;

/// The crates whose files and functions are held to the length limits, and
/// whose modules must not import each other in a cycle.
pub const LIMITED_CRATES: [&str; 2] = ["cloudletd", "qemu"];

/// One Rust source file.
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// Relative to the workspace root, e.g. `crates/qemu/src/vm.rs`.
    pub path: String,
    pub text: String,
}

impl SourceFile {
    #[cfg(test)]
    pub fn new(path: &str, text: &str) -> Self {
        Self {
            path: path.to_string(),
            text: text.to_string(),
        }
    }
}

/// The `src/` folder of `crates/<name>`, as a path prefix (`crates/qemu/src/`).
pub fn src_prefix(crate_dir: &str) -> String {
    format!("crates/{crate_dir}/src/")
}

/// The files in `src/` of the crates held to the length limits.
pub fn limited(files: &[SourceFile]) -> impl Iterator<Item = &SourceFile> {
    let prefixes: Vec<String> = LIMITED_CRATES.iter().map(|c| src_prefix(c)).collect();
    files
        .iter()
        .filter(move |f| prefixes.iter().any(|p| f.path.starts_with(p)))
}

/// Every `.rs` file under `root`, sorted by path.
pub fn read_all(root: &Path) -> anyhow::Result<Vec<SourceFile>> {
    let mut files = Vec::new();
    walk(root, root, &mut files)?;
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}

fn walk(root: &Path, dir: &Path, files: &mut Vec<SourceFile>) -> anyhow::Result<()> {
    let entries = fs::read_dir(dir).with_context(|| format!("Reading {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("Reading {}", dir.display()))?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let kind = entry
            .file_type()
            .with_context(|| format!("Reading {}", path.display()))?;
        if kind.is_dir() {
            if name != "target" && !name.starts_with('.') {
                walk(root, &path, files)?;
            }
        } else if kind.is_file() && name.ends_with(".rs") {
            let text =
                fs::read_to_string(&path).with_context(|| format!("Reading {}", path.display()))?;
            let rel = path.strip_prefix(root).unwrap_or(&path);
            let rel: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            files.push(SourceFile {
                path: rel.join("/"),
                text,
            });
        }
    }
    Ok(())
}
