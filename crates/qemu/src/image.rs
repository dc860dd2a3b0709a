//! Disk images through `qemu-img`: a qcow2 top over a raw base, committing a
//! top into its base, flattening a top to raw.

use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("Cannot run qemu-img: {0}")]
    Spawn(std::io::Error),
    #[error("Cannot give the image to the confined QEMU's uid: {0}")]
    Chown(std::io::Error),
    #[error("qemu-img {op} on {path} failed: {detail}")]
    Failed {
        op: &'static str,
        path: PathBuf,
        detail: String,
    },
}

fn qemu_img(
    op: &'static str,
    path: &Path,
    args: &[&std::ffi::OsStr],
) -> Result<String, ImageError> {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .map_err(ImageError::Spawn)?;
    if !out.status.success() {
        return Err(ImageError::Failed {
            op,
            path: path.to_path_buf(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Create `top` as an empty qcow2 whose backing file is the raw image `base`.
pub fn create_top(base: &Path, top: &Path) -> Result<(), ImageError> {
    let base = std::fs::canonicalize(base).map_err(|e| ImageError::Failed {
        op: "create",
        path: base.to_path_buf(),
        detail: e.to_string(),
    })?;
    qemu_img(
        "create",
        top,
        &[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-F".as_ref(),
            "raw".as_ref(),
            "-b".as_ref(),
            base.as_os_str(),
            top.as_os_str(),
        ],
    )
    .map(|_| ())
}

/// Create an empty qcow2 of `size` bytes, without a backing file.
pub fn create_qcow2(path: &Path, size: u64) -> Result<(), ImageError> {
    qemu_img(
        "create",
        path,
        &[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            path.as_os_str(),
            size.to_string().as_ref(),
        ],
    )
    .map(|_| ())
}

/// The byte ranges `[start, end)` allocated in the qcow2 `path` itself
/// (`qemu-img map`): for an image without a backing file, what was written.
pub fn allocated_extents(path: &Path) -> Result<Vec<(u64, u64)>, ImageError> {
    let out = qemu_img(
        "map",
        path,
        &[
            "map".as_ref(),
            "--output=json".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            path.as_os_str(),
        ],
    )?;
    let bad = |detail: String| ImageError::Failed {
        op: "map",
        path: path.to_path_buf(),
        detail,
    };
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| bad(e.to_string()))?;
    let mut extents = Vec::new();
    for e in v.as_array().ok_or_else(|| bad("not a JSON array".into()))? {
        let n = |k: &str| e.get(k).and_then(serde_json::Value::as_u64);
        let present = e.get("present").and_then(serde_json::Value::as_bool);
        let data = e.get("data").and_then(serde_json::Value::as_bool);
        // Allocated here: data, or a cluster written with zeros.
        if present == Some(true) || data == Some(true) {
            let (Some(start), Some(len)) = (n("start"), n("length")) else {
                return Err(bad(format!("entry without start/length: {e}")));
            };
            extents.push((start, start + len));
        }
    }
    Ok(extents)
}

/// Write the clusters of `top` into its backing file.
pub fn commit_top(top: &Path) -> Result<(), ImageError> {
    qemu_img(
        "commit",
        top,
        &["commit".as_ref(), "-q".as_ref(), top.as_os_str()],
    )
    .map(|_| ())
}

/// Flatten `top` (with its backing chain) into a raw image at `out`.
pub fn convert_to_raw(top: &Path, out: &Path) -> Result<(), ImageError> {
    qemu_img(
        "convert",
        top,
        &[
            "convert".as_ref(),
            "-q".as_ref(),
            "-O".as_ref(),
            "raw".as_ref(),
            top.as_os_str(),
            out.as_os_str(),
        ],
    )
    .map(|_| ())
}

/// First line of `qemu-system-x86_64 --version`.
pub fn qemu_version() -> String {
    Command::new(crate::vm::qemu_binary())
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}
