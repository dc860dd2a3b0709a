//! Files that hold credentials: the operator's config when it holds
//! tokens, the daemon's own token (`home/token`) and directory credential
//! (`home/directory-credential`). None may be readable by anyone but its
//! owner (mode 0600): a config that is refuses the start, with what to
//! run; the daemon's own files are written 0600 and, found more open (an
//! earlier release wrote them 0644), put back to 0600 with a warning.
//!
//! A credential reaches a program from a file ([`read_credential`]: its
//! first line, the file private) or from its environment (which only its
//! owner can read, `/proc/PID/environ` being 0400), never from its command
//! line (`/proc/PID/cmdline` is readable by every user: `ps`).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("{} holds credentials but others may read it (mode {mode:03o}): run `chmod 600 {}`", path.display(), path.display())]
    Exposed { path: PathBuf, mode: u32 },
    #[error("Cannot read the mode of {}: {detail}", path.display())]
    Stat { path: PathBuf, detail: String },
    #[error("Cannot read the credential in {}: {detail}", path.display())]
    Read { path: PathBuf, detail: String },
    #[error("{} holds no credential (its first line is empty)", path.display())]
    Empty { path: PathBuf },
}

/// The permission bits of `path` that let others than its owner in.
fn open_to_others(path: &Path) -> Result<u32, SecretError> {
    let meta = std::fs::metadata(path).map_err(|e| SecretError::Stat {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    Ok(meta.permissions().mode() & 0o777)
}

/// `path` is readable and writable by its owner only.
pub fn check_private(path: &Path) -> Result<(), SecretError> {
    let mode = open_to_others(path)?;
    if mode & 0o077 != 0 {
        return Err(SecretError::Exposed {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// Write `contents` to `path`, mode 0600 from its creation (written aside,
/// then renamed over).
pub fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Read one of the daemon's own credential files, first putting its mode
/// back to 0600 when it is more open.
pub fn read_own(path: &Path) -> std::io::Result<String> {
    let text = std::fs::read_to_string(path)?;
    if let Ok(mode) = open_to_others(path) {
        if mode & 0o077 != 0 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
            tracing::warn!(path = %path.display(), mode = format!("{mode:03o}"), "a credential file others could read: its mode is 0600 now");
        }
    }
    Ok(text)
}

/// The credential in `path`: its first line, trimmed. The file must be
/// private to its owner ([`check_private`]) and the line not empty.
pub fn read_credential(path: &Path) -> Result<String, SecretError> {
    let text = std::fs::read_to_string(path).map_err(|e| SecretError::Read {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    check_private(path)?;
    let line = text.lines().next().unwrap_or("").trim();
    if line.is_empty() {
        return Err(SecretError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(line.to_string())
}

/// A credential from the file `file` if given, else from the environment
/// variable `env` (set and not empty), else none.
pub fn credential_from(file: Option<&Path>, env: &str) -> Result<Option<String>, SecretError> {
    if let Some(f) = file {
        return read_credential(f).map(Some);
    }
    Ok(std::env::var(env)
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_files_are_refused_or_closed_and_new_ones_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cfg.toml");
        std::fs::write(&p, "tokens = [\"t\"]").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = check_private(&p).unwrap_err().to_string();
        assert!(e.contains("mode 644") && e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        check_private(&p).unwrap();

        let own = dir.path().join("token");
        write_private(&own, "secret").unwrap();
        assert_eq!(open_to_others(&own).unwrap(), 0o600);
        std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(read_own(&own).unwrap(), "secret");
        assert_eq!(open_to_others(&own).unwrap(), 0o600, "closed again");
    }

    #[test]
    fn a_credential_file_is_private_and_holds_a_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        write_private(&p, "  s3cret \nignored\n").unwrap();
        assert_eq!(read_credential(&p).unwrap(), "s3cret");
        assert_eq!(
            credential_from(Some(&p), "CLOUDLET_TRUST_TEST_UNSET").unwrap(),
            Some("s3cret".into())
        );
        assert_eq!(
            credential_from(None, "CLOUDLET_TRUST_TEST_UNSET").unwrap(),
            None
        );
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = read_credential(&p).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        write_private(&p, "\n").unwrap();
        assert!(matches!(
            read_credential(&p),
            Err(SecretError::Empty { .. })
        ));
        let e = read_credential(&dir.path().join("none"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("Cannot read the credential"), "{e}");
    }
}
