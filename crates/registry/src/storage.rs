//! Where the registry keeps overlays: a local directory or an S3 bucket.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::ObjectStore;

/// Where overlays are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageLocation {
    /// A local directory (created if missing). The embedded default.
    Dir(PathBuf),
    /// An S3-compatible bucket, objects under `prefix` (may be empty).
    /// Endpoint, region and credentials come from the `AWS_*` environment
    /// variables (`AWS_ENDPOINT`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, ...).
    S3 { bucket: String, prefix: String },
}

/// Why the storage could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenStorageError {
    #[error(
        "Unsupported storage URL {0:?}: expected a directory, file:///DIR or s3://BUCKET/PREFIX"
    )]
    UnsupportedUrl(String),
    #[error("Cannot create the storage directory {}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Invalid object prefix {prefix:?}")]
    Prefix {
        prefix: String,
        #[source]
        source: object_store::path::Error,
    },
    #[error("Cannot open the object store")]
    Store(#[from] object_store::Error),
}

impl FromStr for StorageLocation {
    type Err = OpenStorageError;

    /// `s3://BUCKET[/PREFIX]`, `file:///DIR`, or a plain directory path.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(OpenStorageError::UnsupportedUrl(s.into()));
            }
            return Ok(StorageLocation::S3 {
                bucket: bucket.into(),
                prefix: prefix.trim_matches('/').into(),
            });
        }
        if let Some(path) = s.strip_prefix("file://") {
            if path.is_empty() {
                return Err(OpenStorageError::UnsupportedUrl(s.into()));
            }
            return Ok(StorageLocation::Dir(path.into()));
        }
        if s.is_empty() || s.contains("://") {
            return Err(OpenStorageError::UnsupportedUrl(s.into()));
        }
        Ok(StorageLocation::Dir(s.into()))
    }
}

impl From<PathBuf> for StorageLocation {
    fn from(p: PathBuf) -> Self {
        StorageLocation::Dir(p)
    }
}

impl fmt::Display for StorageLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageLocation::Dir(p) => write!(f, "{}", p.display()),
            StorageLocation::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

impl StorageLocation {
    /// Opens the store; returns it with the prefix under which the registry
    /// keeps its objects.
    pub fn open(&self) -> Result<(Arc<dyn ObjectStore>, ObjectPath), OpenStorageError> {
        match self {
            StorageLocation::Dir(dir) => {
                std::fs::create_dir_all(dir).map_err(|source| OpenStorageError::CreateDir {
                    path: dir.clone(),
                    source,
                })?;
                let store = LocalFileSystem::new_with_prefix(dir)?;
                Ok((Arc::new(store), ObjectPath::default()))
            }
            StorageLocation::S3 { bucket, prefix } => {
                let store = AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .build()?;
                let prefix =
                    ObjectPath::parse(prefix).map_err(|source| OpenStorageError::Prefix {
                        prefix: prefix.clone(),
                        source,
                    })?;
                Ok((Arc::new(store), prefix))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_locations() {
        assert_eq!(
            "s3://bucket/a/b/".parse::<StorageLocation>().unwrap(),
            StorageLocation::S3 {
                bucket: "bucket".into(),
                prefix: "a/b".into()
            }
        );
        assert_eq!(
            "s3://bucket".parse::<StorageLocation>().unwrap(),
            StorageLocation::S3 {
                bucket: "bucket".into(),
                prefix: "".into()
            }
        );
        assert_eq!(
            "file:///srv/reg".parse::<StorageLocation>().unwrap(),
            StorageLocation::Dir("/srv/reg".into())
        );
        assert_eq!(
            "./reg".parse::<StorageLocation>().unwrap(),
            StorageLocation::Dir("./reg".into())
        );
        for bad in ["", "s3://", "gs://bucket", "file://"] {
            assert!(bad.parse::<StorageLocation>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn s3_builds_without_network() {
        let loc: StorageLocation = "s3://bucket/prefix".parse().unwrap();
        // Building does not contact the endpoint.
        let (_, prefix) = loc.open().unwrap();
        assert_eq!(prefix.as_ref(), "prefix");
    }
}
