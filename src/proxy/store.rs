//! The routing store of a running router: reads from the read cache (no database round trip
//! in steady state), everything a write depends on from the database.

use std::sync::Arc;

use crate::datastore::{DatastoreError, StorageCache};
use crate::routing::{ReplicaSet, RoutingStore, StoreError};

/// [`RoutingStore`] over the read cache and the database behind it.
#[derive(Clone)]
pub struct CachedStore {
    pub cache: Arc<StorageCache>,
}

fn store_error(err: DatastoreError) -> StoreError {
    StoreError {
        unavailable: err.is_unavailable(),
        source: Box::new(err),
    }
}

impl RoutingStore for CachedStore {
    async fn cached_consistent(
        &self,
        virtual_storage: &str,
        relative_path: &str,
    ) -> Result<Option<Arc<ReplicaSet>>, StoreError> {
        self.cache
            .get(virtual_storage, relative_path)
            .await
            .map_err(store_error)
    }

    async fn consistent(
        &self,
        virtual_storage: &str,
        relative_path: &str,
    ) -> Result<Option<ReplicaSet>, StoreError> {
        self.cache
            .store()
            .consistent_storages(virtual_storage, relative_path)
            .await
            .map_err(store_error)
    }

    async fn recorded(
        &self,
        virtual_storage: &str,
        relative_path: &str,
    ) -> Result<Option<ReplicaSet>, StoreError> {
        self.cache
            .store()
            .recorded_replicas(virtual_storage, relative_path)
            .await
            .map_err(store_error)
    }

    async fn primary(&self, repository_id: i64) -> Result<Option<String>, StoreError> {
        self.cache
            .store()
            .get_primary(repository_id)
            .await
            .map(|primary| primary.storage)
            .map_err(store_error)
    }

    async fn assignments(&self, repository_id: i64) -> Result<Vec<String>, StoreError> {
        self.cache
            .store()
            .assignments(repository_id)
            .await
            .map_err(store_error)
    }

    async fn reserve_repository_id(
        &self,
        virtual_storage: &str,
        relative_path: &str,
    ) -> Result<Option<i64>, StoreError> {
        match self
            .cache
            .store()
            .reserve_repository_id(virtual_storage, relative_path)
            .await
        {
            Ok(id) => Ok(Some(id)),
            Err(DatastoreError::RepositoryExists) => Ok(None),
            Err(err) => Err(store_error(err)),
        }
    }
}
