//! Where the archive is: a local directory (the embedded default, `<data dir>/archive`) or an S3
//! bucket (any S3-compatible server), opened as an [`ObjectStore`].

use std::path::PathBuf;
use std::sync::Arc;

use loom_schemas::{ExposeSecret, SecretString};
use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;

/// How to reach an S3-compatible server.
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    /// The server's URL (`http://127.0.0.1:9000`); AWS's own endpoint when unset.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<SecretString>,
    /// Path-style requests (`endpoint/bucket/key`), which most S3-compatible servers need.
    pub path_style: bool,
}

#[derive(Debug, Clone)]
pub enum ArchiveLocation {
    /// Files under a local directory.
    Directory(PathBuf),
    /// Objects in `bucket`, under `prefix` (may be empty).
    S3 {
        bucket: String,
        prefix: String,
        options: S3Options,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum LocationError {
    #[error("creating the archive directory {}: {source}", path.display())]
    Directory {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("opening the archive at {location}: {source}")]
    Open {
        location: String,
        #[source]
        source: object_store::Error,
    },
    #[error("{0:?} names no bucket: write s3://BUCKET or s3://BUCKET/PREFIX")]
    NoBucket(String),
}

impl ArchiveLocation {
    /// `s3://bucket[/prefix]` (with `options`), else a directory.
    pub fn parse(text: &str, options: S3Options) -> Result<ArchiveLocation, LocationError> {
        let Some(rest) = text.strip_prefix("s3://") else {
            return Ok(ArchiveLocation::Directory(PathBuf::from(text)));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(LocationError::NoBucket(text.to_owned()));
        }
        Ok(ArchiveLocation::S3 {
            bucket: bucket.to_owned(),
            prefix: prefix.trim_matches('/').to_owned(),
            options,
        })
    }

    /// The archive as an object store, and the prefix every object of the archive is under.
    pub fn open(&self) -> Result<(Arc<dyn ObjectStore>, Path), LocationError> {
        match self {
            ArchiveLocation::Directory(path) => {
                std::fs::create_dir_all(path).map_err(|source| LocationError::Directory {
                    path: path.clone(),
                    source,
                })?;
                let store = LocalFileSystem::new_with_prefix(path)
                    .map_err(|source| self.open_error(source))?
                    .with_automatic_cleanup(true);
                Ok((Arc::new(store), Path::default()))
            }
            ArchiveLocation::S3 {
                bucket,
                prefix,
                options,
            } => {
                // The usual AWS_* variables first (credentials, session token, web identity);
                // what was given explicitly wins.
                let mut builder = AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_virtual_hosted_style_request(!options.path_style);
                if let Some(region) = &options.region {
                    builder = builder.with_region(region);
                }
                if let Some(endpoint) = &options.endpoint {
                    builder = builder
                        .with_allow_http(endpoint.starts_with("http://"))
                        .with_endpoint(endpoint);
                }
                if let Some(id) = &options.access_key_id {
                    builder = builder.with_access_key_id(id);
                }
                if let Some(secret) = &options.secret_access_key {
                    builder = builder.with_secret_access_key(secret.expose_secret());
                }
                let store = builder.build().map_err(|source| self.open_error(source))?;
                Ok((Arc::new(store), Path::from(prefix.as_str())))
            }
        }
    }

    fn open_error(&self, source: object_store::Error) -> LocationError {
        LocationError::Open {
            location: self.to_string(),
            source,
        }
    }
}

impl std::fmt::Display for ArchiveLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ArchiveLocation::Directory(path) => write!(f, "{}", path.display()),
            ArchiveLocation::S3 { bucket, prefix, .. } if prefix.is_empty() => {
                write!(f, "s3://{bucket}")
            }
            ArchiveLocation::S3 { bucket, prefix, .. } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}
