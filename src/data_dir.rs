//! The data directory, and the only place that knows its layout.

use std::path::{Path, PathBuf};

/// `--data-dir`: everything a node keeps on its own disk.
///
/// | Path | What |
/// | --- | --- |
/// | `log/` | the embedded log (`log/quarantine/`: bytes cut off it) |
/// | `spool/` | with Kafka: events waiting for the broker |
/// | `keys.json` | the file key store |
/// | `master.key` | the generated master key, when `LOOM_MASTER_KEY` is not set |
/// | `read-models/` | the SQLite read models of `loom serve` |
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataDir(PathBuf);

impl DataDir {
    pub fn new(path: impl Into<PathBuf>) -> DataDir {
        DataDir(path.into())
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn log(&self) -> PathBuf {
        self.0.join("log")
    }

    pub fn spool(&self) -> PathBuf {
        self.0.join("spool")
    }

    pub fn keys_file(&self) -> PathBuf {
        self.0.join("keys.json")
    }

    pub fn master_key_file(&self) -> PathBuf {
        self.0.join("master.key")
    }

    pub fn read_models(&self) -> PathBuf {
        self.0.join("read-models")
    }

    pub fn archive(&self) -> PathBuf {
        self.0.join("archive")
    }

    /// Where `POST /v1/exports` writes its Delta tables by default.
    pub fn exports(&self) -> PathBuf {
        self.0.join("exports")
    }
}

impl Default for DataDir {
    /// `./loom-data`, `--data-dir`'s default.
    fn default() -> DataDir {
        DataDir::new("./loom-data")
    }
}
