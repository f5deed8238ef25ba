//! A read-only view of the archive's object store bounded to some prefixes: what a query session
//! is given instead of the store itself, so that even a plan naming another tenant's file (or a
//! write) is refused by the store — a second wall behind the table listing.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::DateTime;
use futures_util::StreamExt;
use futures_util::stream::{self, BoxStream};
use object_store::path::Path;
use object_store::{
    Attributes, CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload,
    ObjectMeta, ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions,
    Result,
};

#[derive(Debug)]
pub struct BoundedStore {
    inner: Arc<dyn ObjectStore>,
    /// The prefixes readable; every path outside them is refused.
    prefixes: Vec<Path>,
    /// Files known to exist, by their size: a `head` of one is answered without a request.
    files: HashMap<Path, u64>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refused(&'static str);

impl BoundedStore {
    pub fn new(inner: Arc<dyn ObjectStore>, prefixes: Vec<Path>) -> BoundedStore {
        BoundedStore {
            inner,
            prefixes,
            files: HashMap::new(),
        }
    }

    /// Answers `head` of these files (path, size) itself. Archive files never change once
    /// written (each has a name of its own), and the manifests that name them hold their sizes:
    /// a query over a tenant's files would otherwise make one request per file to plan.
    pub fn with_files(mut self, files: impl IntoIterator<Item = (Path, u64)>) -> BoundedStore {
        self.files.extend(files);
        self
    }

    fn check(&self, path: &Path) -> Result<()> {
        if self
            .prefixes
            .iter()
            .any(|prefix| path.prefix_matches(prefix))
        {
            Ok(())
        } else {
            Err(refused(path, "outside the prefixes this session may read"))
        }
    }
}

fn refused(path: &Path, why: &'static str) -> object_store::Error {
    object_store::Error::PermissionDenied {
        path: path.to_string(),
        source: Box::new(Refused(why)),
    }
}

impl fmt::Display for BoundedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "BoundedStore({}, {} prefixes)",
            self.inner,
            self.prefixes.len()
        )
    }
}

// Every method is forwarded or refused: a default would bypass what the inner store does better
// (the trait's `get_ranges` coalesces ranges up to 1 MiB apart, so on a local directory every
// read of a column chunk read most of a small file).
#[async_trait]
#[deny(clippy::missing_trait_methods)]
impl ObjectStore for BoundedStore {
    async fn put_opts(&self, location: &Path, _: PutPayload, _: PutOptions) -> Result<PutResult> {
        Err(refused(location, "read only"))
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        _: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        Err(refused(location, "read only"))
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.check(location)?;
        if options.head
            && let Some(&size) = self.files.get(location)
        {
            return Ok(GetResult {
                payload: GetResultPayload::Stream(stream::empty().boxed()),
                meta: ObjectMeta {
                    location: location.clone(),
                    // Unknown, and the same for every query: the size and the name identify
                    // the file.
                    last_modified: DateTime::UNIX_EPOCH,
                    size,
                    e_tag: None,
                    version: None,
                },
                range: 0..size,
                attributes: Attributes::default(),
            });
        }
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.check(location)?;
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        locations
            .map(|location| Err(refused(&location?, "read only")))
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        let prefix = prefix.cloned().unwrap_or_default();
        match self.check(&prefix) {
            Ok(()) => self.inner.list(Some(&prefix)),
            Err(error) => stream::once(async move { Err(error) }).boxed(),
        }
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        let prefix = prefix.cloned().unwrap_or_default();
        match self.check(&prefix) {
            Ok(()) => self.inner.list_with_offset(Some(&prefix), offset),
            Err(error) => stream::once(async move { Err(error) }).boxed(),
        }
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        let prefix = prefix.cloned().unwrap_or_default();
        self.check(&prefix)?;
        self.inner.list_with_delimiter(Some(&prefix)).await
    }

    async fn copy_opts(&self, _: &Path, to: &Path, _: CopyOptions) -> Result<()> {
        Err(refused(to, "read only"))
    }

    async fn rename_opts(&self, _: &Path, to: &Path, _: RenameOptions) -> Result<()> {
        Err(refused(to, "read only"))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use object_store::memory::InMemory;
    use object_store::{ObjectStore, ObjectStoreExt};

    use super::*;

    #[tokio::test]
    async fn reads_inside_its_prefixes_only_and_writes_nothing() {
        let inner = Arc::new(InMemory::new());
        for path in [
            "archive/tenant_id=a/f.parquet",
            "archive/tenant_id=b/f.parquet",
        ] {
            inner.put(&Path::from(path), "x".into()).await.unwrap();
        }
        let store = BoundedStore::new(inner, vec![Path::from("archive/tenant_id=a")]);
        store
            .get(&Path::from("archive/tenant_id=a/f.parquet"))
            .await
            .unwrap();
        for path in [
            "archive/tenant_id=b/f.parquet",
            "archive/tenant_id=ab/f.parquet",
            "archive",
        ] {
            let refused = store.get(&Path::from(path)).await.unwrap_err();
            assert!(
                matches!(refused, object_store::Error::PermissionDenied { .. }),
                "{path}"
            );
        }
        assert!(
            store
                .list(Some(&Path::from("archive")))
                .next()
                .await
                .unwrap()
                .is_err()
        );
        let listed = store
            .list_with_delimiter(Some(&Path::from("archive/tenant_id=a")))
            .await
            .unwrap();
        assert_eq!(listed.objects.len(), 1);
        let write = store
            .put(&Path::from("archive/tenant_id=a/g.parquet"), "y".into())
            .await;
        assert!(write.is_err());
    }

    #[tokio::test]
    async fn answers_the_head_of_a_known_file_itself_and_still_bounds_it() {
        let inner = Arc::new(InMemory::new());
        let store = BoundedStore::new(inner, vec![Path::from("archive/tenant_id=a")]).with_files([
            (Path::from("archive/tenant_id=a/known.parquet"), 1234),
            (Path::from("archive/tenant_id=b/known.parquet"), 1234),
        ]);
        // Not in the inner store at all: answered from what the manifest said.
        let meta = store
            .head(&Path::from("archive/tenant_id=a/known.parquet"))
            .await
            .unwrap();
        assert_eq!(meta.size, 1234);
        // Reads still go to the store, and another tenant's file is refused even when known.
        assert!(matches!(
            store
                .get(&Path::from("archive/tenant_id=a/known.parquet"))
                .await,
            Err(object_store::Error::NotFound { .. })
        ));
        assert!(matches!(
            store
                .head(&Path::from("archive/tenant_id=b/known.parquet"))
                .await,
            Err(object_store::Error::PermissionDenied { .. })
        ));
        assert!(matches!(
            store
                .head(&Path::from("archive/tenant_id=a/other.parquet"))
                .await,
            Err(object_store::Error::NotFound { .. })
        ));
    }
}
