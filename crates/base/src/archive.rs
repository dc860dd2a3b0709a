//! `cloudlet base export` / `import`: a base VM as one file.
//!
//! The file is a zstd-compressed tar (zstd frame checksums on) holding
//! `manifest.json` first and then the files of [`BASE_FILES`]. Import
//! unpacks into a hidden directory, writing runs of zeros as holes, checks
//! every file against the manifest's BLAKE3 hash and the manifest's id, and
//! only then renames the directory into the store: a damaged export leaves
//! nothing behind.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::store::{hash_files, parse_manifest};
use crate::{BaseManifest, BaseStore, BASE_FILES};

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error(transparent)]
    Base(#[from] crate::BaseError),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("Export {path} is corrupt: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("A base named {0:?} already exists (delete it first)")]
    Exists(String),
}

/// Write base `name` to `out` as one file.
pub fn export_base(store: &BaseStore, name: &str, out: &Path) -> Result<u64, ArchiveError> {
    let base = store.get(name)?;
    let io = |source| ArchiveError::Io {
        path: out.to_path_buf(),
        source,
    };
    let tmp = out.with_extension("partial");
    let file = std::fs::File::create(&tmp).map_err(io)?;
    let result = (|| {
        let mut enc = zstd::Encoder::new(file, 3)?;
        enc.include_checksum(true)?;
        enc.multithread(2)?;
        let mut tar = tar::Builder::new(enc);
        tar.mode(tar::HeaderMode::Deterministic);
        tar.append_path_with_name(base.dir.join("manifest.json"), "manifest.json")?;
        for f in BASE_FILES {
            tar.append_path_with_name(base.dir.join(f), f)?;
        }
        let enc = tar.into_inner()?;
        let file = enc.finish()?;
        file.sync_all()?;
        Ok::<_, std::io::Error>(file.metadata()?.len())
    })();
    match result {
        Ok(size) => {
            std::fs::rename(&tmp, out).map_err(io)?;
            Ok(size)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(io(e))
        }
    }
}

/// Read an export into the store under its own name (or `rename`).
pub fn import_base(
    store: &BaseStore,
    file: &Path,
    rename: Option<&str>,
) -> Result<BaseManifest, ArchiveError> {
    let bases = store.bases_dir();
    std::fs::create_dir_all(&bases).map_err(|source| ArchiveError::Io {
        path: bases.clone(),
        source,
    })?;
    let work = bases.join(format!(
        ".import-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let result = unpack_and_check(store, file, &work, rename);
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&work);
    }
    result
}

fn unpack_and_check(
    store: &BaseStore,
    file: &Path,
    work: &Path,
    rename: Option<&str>,
) -> Result<BaseManifest, ArchiveError> {
    let corrupt = |detail: String| ArchiveError::Corrupt {
        path: file.to_path_buf(),
        detail,
    };
    let input = std::fs::File::open(file).map_err(|source| ArchiveError::Io {
        path: file.to_path_buf(),
        source,
    })?;
    std::fs::create_dir_all(work).map_err(|source| ArchiveError::Io {
        path: work.to_path_buf(),
        source,
    })?;
    let dec = zstd::Decoder::new(input).map_err(|e| corrupt(e.to_string()))?;
    let mut tar = tar::Archive::new(dec);
    let mut seen = Vec::new();
    for entry in tar.entries().map_err(|e| corrupt(e.to_string()))? {
        let mut entry = entry.map_err(|e| corrupt(e.to_string()))?;
        let name = entry
            .path()
            .map_err(|e| corrupt(e.to_string()))?
            .to_string_lossy()
            .into_owned();
        if name != "manifest.json" && !BASE_FILES.contains(&name.as_str()) {
            return Err(corrupt(format!("unexpected entry {name:?}")));
        }
        if seen.contains(&name) {
            return Err(corrupt(format!("duplicate entry {name:?}")));
        }
        let dest = work.join(&name);
        write_sparse(&mut entry, &dest).map_err(|e| corrupt(format!("{name}: {e}")))?;
        seen.push(name);
    }
    if seen.len() != BASE_FILES.len() + 1 {
        return Err(corrupt(format!(
            "holds {} of {} entries",
            seen.len(),
            BASE_FILES.len() + 1
        )));
    }
    let bytes = std::fs::read(work.join("manifest.json")).map_err(|e| corrupt(e.to_string()))?;
    let mut manifest = parse_manifest("import", &bytes)?;
    let files = hash_files(work).map_err(|e| corrupt(e.to_string()))?;
    for (got, want) in files.iter().zip(&manifest.files) {
        if got != want {
            return Err(corrupt(format!("{} does not match its hash", want.name)));
        }
    }
    if manifest.files.len() != files.len() || manifest.compute_id() != manifest.id {
        return Err(corrupt("id does not match the content".into()));
    }
    if let Some(n) = rename {
        manifest.name = n.to_string();
        let json = serde_json::to_vec_pretty(&manifest).map_err(|e| corrupt(e.to_string()))?;
        cloudlet_qemu::files::write_atomic(&work.join("manifest.json"), &json).map_err(
            |source| ArchiveError::Io {
                path: work.to_path_buf(),
                source,
            },
        )?;
    }
    let dest = store.base_dir(&manifest.name);
    if dest.exists() {
        return Err(ArchiveError::Exists(manifest.name));
    }
    std::fs::rename(work, &dest).map_err(|source| ArchiveError::Io { path: dest, source })?;
    Ok(manifest)
}

/// Copy a reader into a new file, leaving 64 KiB runs of zeros as holes.
fn write_sparse(r: &mut impl Read, dest: &Path) -> std::io::Result<u64> {
    let mut out = std::fs::File::create(dest)?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut len = 0u64;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            let n = r.read(&mut buf[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        if buf[..filled].iter().all(|&b| b == 0) {
            out.seek(SeekFrom::Current(filled as i64))?;
        } else {
            out.write_all(&buf[..filled])?;
        }
        len += filled as u64;
    }
    out.set_len(len)?;
    out.sync_all()?;
    Ok(len)
}
