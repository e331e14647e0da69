//! The persisted uid high-water mark: the last uid ever handed out, kept in a ConfigMap and
//! updated with optimistic concurrency (resourceVersion), so a uid is never handed out twice —
//! not after a deletion, not across controller restarts, not by two controllers racing during a
//! leader hand-over.
//!
//! The mark is one of two records: every Server's ledger also keeps the highest uid it ever
//! admitted (`status.highestUid`, which its schema lets only grow). Allocation starts above both,
//! so a mark edited down hands out nothing already used; a mark that is missing while uids exist
//! fails closed: no uid is handed out until a person restores it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::Mutex;
use uwsgi_it_domain::identity::{ObjectKey, UidAllocation, allocate_uids};

const KEY: &str = "highWaterMark";

/// Errors of the uid store.
#[derive(Debug, thiserror::Error)]
pub enum UidStoreError {
    /// The API call failed.
    #[error("uid store ConfigMap {name}: {source}")]
    Api {
        /// ConfigMap name.
        name: String,
        /// The API error.
        source: kube::Error,
    },
    /// The stored mark is not a number.
    #[error("uid store ConfigMap {name}: {KEY} is {value:?}, not a uid")]
    Corrupt {
        /// ConfigMap name.
        name: String,
        /// What it holds.
        value: String,
    },
    /// The record is missing although uids were handed out: restoring it is a person's call.
    #[error(
        "the uid record (ConfigMap {name}, key {KEY}) is missing although uids up to {highest} \
         are recorded; no uid is handed out until it is restored with {KEY} at least {highest} \
         (higher if containers were deleted since)"
    )]
    RecordMissing {
        /// ConfigMap name.
        name: String,
        /// The highest uid recorded elsewhere (ledgers, containers).
        highest: u32,
    },
    /// No uid left.
    #[error(transparent)]
    Exhausted(#[from] uwsgi_it_domain::identity::UidError),
}

struct Cached {
    mark: Option<u32>,
    resource_version: Option<String>,
}

/// Allocates uids and persists the high-water mark before anyone sees them.
pub struct UidStore {
    api: Api<ConfigMap>,
    name: String,
    cached: Mutex<Option<Cached>>,
}

impl UidStore {
    /// A store kept in ConfigMap `name` of the given API (namespace).
    pub fn new(api: Api<ConfigMap>, name: String) -> Self {
        UidStore {
            api,
            name,
            cached: Mutex::new(None),
        }
    }

    fn error(&self, source: kube::Error) -> UidStoreError {
        UidStoreError::Api {
            name: self.name.clone(),
            source,
        }
    }

    async fn load(&self) -> Result<Cached, UidStoreError> {
        match self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|e| self.error(e))?
        {
            None => Ok(Cached {
                mark: None,
                resource_version: None,
            }),
            Some(map) => {
                let value = map.data.as_ref().and_then(|d| d.get(KEY)).cloned();
                let mark = match value {
                    None => None,
                    Some(v) => Some(v.trim().parse().map_err(|_| UidStoreError::Corrupt {
                        name: self.name.clone(),
                        value: v.clone(),
                    })?),
                };
                Ok(Cached {
                    mark,
                    resource_version: map.metadata.resource_version,
                })
            }
        }
    }

    /// Hands out one new uid per key (older keys get lower uids), above the mark and above
    /// `floor` (the highest uid recorded anywhere else). The new mark is persisted before this
    /// returns, so a crash afterwards can waste uids but never reuse one.
    pub async fn allocate(
        &self,
        floor: u32,
        needing: &[ObjectKey],
    ) -> Result<UidAllocation, UidStoreError> {
        let mut cached = self.cached.lock().await;
        loop {
            if cached.is_none() {
                *cached = Some(self.load().await?);
            }
            let current = cached.as_ref().expect("loaded above");
            if current.mark.is_none() && floor >= uwsgi_it_domain::identity::FIRST_UID {
                // Loaded again on the next call: a restored record is used at once.
                *cached = None;
                return Err(UidStoreError::RecordMissing {
                    name: self.name.clone(),
                    highest: floor,
                });
            }
            let allocation = allocate_uids(current.mark, [floor], needing)?;
            if needing.is_empty() || Some(allocation.high_water_mark) == current.mark {
                return Ok(allocation);
            }
            let map = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    resource_version: current.resource_version.clone(),
                    ..ObjectMeta::default()
                },
                data: Some(BTreeMap::from([(
                    KEY.to_string(),
                    allocation.high_water_mark.to_string(),
                )])),
                ..ConfigMap::default()
            };
            let written = match &current.resource_version {
                None => self.api.create(&PostParams::default(), &map).await,
                Some(_) => {
                    self.api
                        .replace(&self.name, &PostParams::default(), &map)
                        .await
                }
            };
            match written {
                Ok(map) => {
                    *cached = Some(Cached {
                        mark: Some(allocation.high_water_mark),
                        resource_version: map.metadata.resource_version,
                    });
                    return Ok(allocation);
                }
                // Someone else moved the mark (or created the map) since we read it: read again
                // and allocate above the new mark.
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    *cached = None;
                }
                // Deleted since it was read: read again, which fails closed if uids exist.
                Err(kube::Error::Api(status)) if status.code == 404 => {
                    *cached = None;
                }
                Err(e) => {
                    *cached = None;
                    return Err(self.error(e));
                }
            }
        }
    }
}
