//! PostgreSQL: the durable store many replicas share (SPEC §8).

use std::path::Path;

use super::StoreError;

pub struct PostgresStore;

impl PostgresStore {
    pub async fn open(
        _url: &str,
        _data_dir: &Path,
        _instance: &str,
    ) -> Result<std::sync::Arc<dyn super::Store>, StoreError> {
        Err(StoreError::Unavailable {
            reason: "not built yet".into(),
            retryable: false,
        })
    }
}
