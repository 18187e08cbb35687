//! The per-repository router: every routing decision, as async functions of the request's
//! repositories, this router's view of node health and the store's answers. Nothing here
//! touches the wire; the proxy reads the first message into the arguments and applies the
//! returned plan.

use rand::seq::SliceRandom;

use super::error::RoutingError;
use super::plan::{
    AccessorRoute, CreationRoute, MaintenanceRoute, MutatorRoute, Neighbour, NeighbourSource,
    RepositoryRef, StorageRoute, WriteRoute,
};
use super::relative_path;
use super::replica_path::{is_rails_pool_path, pool_replica_path, replica_path};
use super::store::{HealthView, ReplicaSet, RoutingStore};
use super::topology::{Topology, VirtualStorage};

/// What a write request names, besides its target repository.
#[derive(Clone, Debug, Default)]
pub struct WriteRequest {
    pub repository: RepositoryRef,
    /// The annotated additional repository (an object pool's origin, a fetch source).
    pub additional: Option<RepositoryRef>,
    /// Whether the call creates the repository, and whether it updates it if it exists.
    pub creates: bool,
    pub upserts: bool,
    /// CreateFork's source repository.
    pub fork_source: Option<RepositoryRef>,
    /// The `gitaly-partitioning-hint` metadata: a relative path to place the new one next to.
    pub partitioning_hint: Option<String>,
}

/// Routes calls of the virtual storages of `topology`.
pub struct Router<S, H> {
    topology: Topology,
    store: S,
    health: H,
}

impl<S: RoutingStore, H: HealthView> Router<S, H> {
    pub fn new(topology: Topology, store: S, health: H) -> Self {
        Router {
            topology,
            store,
            health,
        }
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// A configured virtual storage, by a name the client sent.
    pub fn virtual_storage(&self, name: &str) -> Result<&VirtualStorage, RoutingError> {
        if name.is_empty() {
            return Err(RoutingError::StorageNameNotSet);
        }
        self.topology.get(name).ok_or(RoutingError::StorageNotFound)
    }

    /// A repository must name a configured virtual storage and a valid relative path
    /// (checked before anything is looked up, recorded or sent).
    pub fn check_repository(&self, repository: &RepositoryRef) -> Result<(), RoutingError> {
        self.virtual_storage(&repository.storage_name)?;
        check_relative_path(&repository.relative_path)
    }

    /// The locally healthy storages of a virtual storage; an error when there are none.
    fn healthy(&self, virtual_storage: &str) -> Result<Vec<String>, RoutingError> {
        let healthy: Vec<String> = self
            .health
            .healthy()
            .get(virtual_storage)
            .map(|set| set.iter().cloned().collect())
            .unwrap_or_default();
        if healthy.is_empty() {
            return Err(RoutingError::NoHealthyNodes);
        }
        Ok(healthy)
    }

    /// Storage-scoped reads go to any healthy node of the virtual storage.
    pub fn route_storage_accessor(
        &self,
        virtual_storage: &str,
    ) -> Result<StorageRoute, RoutingError> {
        self.virtual_storage(virtual_storage)?;
        let healthy = self.healthy(virtual_storage)?;
        let storage = healthy
            .choose(&mut rand::thread_rng())
            .cloned()
            .ok_or(RoutingError::NoHealthyNodes)?;
        Ok(StorageRoute { storage })
    }

    /// Reads go to a random healthy replica that holds the latest generation, as the read
    /// cache knows it; or to the primary, when `force_primary`.
    pub async fn route_accessor(
        &self,
        repository: &RepositoryRef,
        additional: Option<&RepositoryRef>,
        force_primary: bool,
    ) -> Result<AccessorRoute, RoutingError> {
        self.route_accessor_avoiding(repository, additional, force_primary, None)
            .await
    }

    /// Like [`Router::route_accessor`], but not to `avoid` unless it is the forced primary:
    /// a read whose node could not be reached goes to another up-to-date replica.
    pub async fn route_accessor_avoiding(
        &self,
        repository: &RepositoryRef,
        additional: Option<&RepositoryRef>,
        force_primary: bool,
        avoid: Option<&str>,
    ) -> Result<AccessorRoute, RoutingError> {
        self.check_repository(repository)?;
        let healthy = self.healthy(&repository.storage_name)?;
        let (storage, replica_path) = if force_primary {
            // Boxed: an election's future is large and rare; reads from any replica should
            // not carry its size.
            let (entry, primary) = Box::pin(self.healthy_primary(
                repository,
                &healthy,
                RoutingError::RepositoryNotFound,
            ))
            .await?;
            (primary, entry.replica_path)
        } else {
            let entry = self
                .store
                .cached_consistent(&repository.storage_name, &repository.relative_path)
                .await?
                .ok_or(RoutingError::RepositoryNotFound)?;
            let candidates: Vec<&String> = entry
                .storages
                .iter()
                .filter(|s| healthy.contains(s) && Some(s.as_str()) != avoid)
                .collect();
            let storage = candidates
                .choose(&mut rand::thread_rng())
                .map(|s| s.to_string())
                .ok_or(RoutingError::NoSuitableNode)?;
            (storage, entry.replica_path.clone())
        };
        let additional_replica_path = match additional {
            Some(other) => {
                check_additional(repository, other)?;
                let entry = self
                    .store
                    .cached_consistent(&other.storage_name, &other.relative_path)
                    .await?
                    .ok_or(RoutingError::AdditionalRepositoryNotFound)?;
                Some(entry.replica_path.clone())
            }
            None => None,
        };
        Ok(AccessorRoute {
            storage,
            replica_path,
            additional_replica_path,
        })
    }

    /// A write: a creation (placement, a new id) or, for an existing repository, its primary,
    /// which must be healthy, up to date and assigned.
    pub async fn route_write(&self, request: &WriteRequest) -> Result<WriteRoute, RoutingError> {
        self.check_repository(&request.repository)?;
        let healthy = self.healthy(&request.repository.storage_name)?;
        if request.creates {
            match self.route_creation(request, &healthy).await {
                Err(RoutingError::RepositoryExists) if request.upserts => {}
                other => return other.map(WriteRoute::Create),
            }
        }
        self.route_mutator(&request.repository, request.additional.as_ref(), &healthy)
            .await
            .map(WriteRoute::Update)
    }

    async fn route_mutator(
        &self,
        repository: &RepositoryRef,
        additional: Option<&RepositoryRef>,
        healthy: &[String],
    ) -> Result<MutatorRoute, RoutingError> {
        let (entry, primary) = self
            .healthy_primary(repository, healthy, RoutingError::RepositoryNotFound)
            .await?;
        if !entry.storages.contains(&primary) {
            return Err(RoutingError::ReadOnly);
        }
        let (assigned, _) = self
            .assignments(&repository.storage_name, entry.repository_id)
            .await?;
        if !assigned.contains(&primary) {
            return Err(RoutingError::PrimaryNotAssigned);
        }
        let additional_replica_path = match additional {
            Some(other) => {
                check_additional(repository, other)?;
                let other = self
                    .store
                    .consistent(&other.storage_name, &other.relative_path)
                    .await?
                    .ok_or(RoutingError::AdditionalRepositoryNotFound)?;
                Some(other.replica_path)
            }
            None => None,
        };
        let (secondaries, replication_targets) = assigned
            .into_iter()
            .filter(|s| *s != primary)
            .partition(|s| entry.storages.contains(s) && healthy.contains(s));
        Ok(MutatorRoute {
            repository: repository.clone(),
            repository_id: entry.repository_id,
            replica_path: entry.replica_path,
            additional_replica_path,
            primary,
            secondaries,
            replication_targets,
        })
    }

    /// A new repository: next to the repository the request names (same primary, same
    /// assignments), or on a random healthy primary with the replication factor's number of
    /// other storages chosen at random.
    async fn route_creation(
        &self,
        request: &WriteRequest,
        healthy: &[String],
    ) -> Result<CreationRoute, RoutingError> {
        let repository = &request.repository;
        let virtual_storage = self.virtual_storage(&repository.storage_name)?;
        let neighbour = neighbour(request);
        let placement = match &neighbour {
            Some((other, named_by)) => Some(
                self.place_next_to(repository, other, *named_by, healthy)
                    .await?,
            ),
            None => None,
        };
        let repository_id = self
            .store
            .reserve_repository_id(&repository.storage_name, &repository.relative_path)
            .await?
            .ok_or(RoutingError::RepositoryExists)?;
        let (primary, (secondaries, replication_targets), store_assignments, neighbour) =
            match placement {
                Some(next_to) => {
                    // Next to a repository: its healthy replicas at its latest generation
                    // take part; the others catch up by replication.
                    let split = next_to
                        .others
                        .into_iter()
                        .partition(|s| healthy.contains(s) && next_to.consistent.contains(s));
                    (
                        next_to.primary,
                        split,
                        next_to.explicit,
                        Some(next_to.neighbour),
                    )
                }
                None => {
                    let (primary, others) = place_by_factor(virtual_storage, healthy)?;
                    let split = others.into_iter().partition(|s| healthy.contains(s));
                    (
                        primary,
                        split,
                        virtual_storage.default_replication_factor > 0,
                        None,
                    )
                }
            };
        let replica_path = if is_rails_pool_path(&repository.relative_path) {
            pool_replica_path(repository_id)
        } else {
            replica_path(repository_id)
        };
        Ok(CreationRoute {
            repository: repository.clone(),
            repository_id,
            replica_path,
            primary,
            secondaries,
            replication_targets,
            store_assignments,
            neighbour,
        })
    }

    /// Placement of a repository created next to another one (a fork next to its source, a
    /// pool next to its origin): the same storages, the same primary, which must be healthy.
    async fn place_next_to(
        &self,
        repository: &RepositoryRef,
        other: &RepositoryRef,
        named_by: NeighbourSource,
        healthy: &[String],
    ) -> Result<Placement, RoutingError> {
        check_additional(repository, other)?;
        let (entry, primary) = self
            .healthy_primary(other, healthy, RoutingError::AdditionalRepositoryNotFound)
            .await?;
        let (assigned, explicit) = self
            .assignments(&other.storage_name, entry.repository_id)
            .await?;
        Ok(Placement {
            others: assigned.into_iter().filter(|s| *s != primary).collect(),
            consistent: entry.storages,
            primary,
            explicit,
            neighbour: Neighbour {
                replica_path: entry.replica_path,
                named_by,
            },
        })
    }

    /// Maintenance goes to every replica that exists, is assigned and is locally healthy.
    pub async fn route_maintenance(
        &self,
        repository: &RepositoryRef,
    ) -> Result<MaintenanceRoute, RoutingError> {
        self.check_repository(repository)?;
        let healthy = self.healthy(&repository.storage_name)?;
        let replicas = self
            .store
            .recorded(&repository.storage_name, &repository.relative_path)
            .await?
            .ok_or(RoutingError::RepositoryNotFound)?;
        let (assigned, _) = self
            .assignments(&repository.storage_name, replicas.repository_id)
            .await?;
        let storages: Vec<String> = replicas
            .storages
            .into_iter()
            .filter(|s| healthy.contains(s) && assigned.contains(s))
            .collect();
        if storages.is_empty() {
            return Err(RoutingError::NoSuitableNode);
        }
        Ok(MaintenanceRoute {
            repository_id: replicas.repository_id,
            replica_path: replicas.replica_path,
            storages,
        })
    }

    /// A repository's up-to-date storages and its primary, which must be locally healthy:
    /// elected if needed (the database is asked every time, never the read cache). `missing`
    /// is the error for an untracked repository.
    async fn healthy_primary(
        &self,
        repository: &RepositoryRef,
        healthy: &[String],
        missing: RoutingError,
    ) -> Result<(ReplicaSet, String), RoutingError> {
        let entry = self
            .store
            .consistent(&repository.storage_name, &repository.relative_path)
            .await?
            .ok_or(missing)?;
        let primary = self
            .store
            .primary(entry.repository_id)
            .await?
            .ok_or(RoutingError::NoPrimary)?;
        if !healthy.contains(&primary) {
            return Err(RoutingError::PrimaryUnhealthy);
        }
        Ok((entry, primary))
    }

    /// The storages assigned to host a repository (its recorded assignments that are still
    /// configured, or every configured storage when there are none), and whether it has
    /// explicit assignments at all.
    async fn assignments(
        &self,
        virtual_storage: &str,
        repository_id: i64,
    ) -> Result<(Vec<String>, bool), RoutingError> {
        let configured = self
            .topology
            .get(virtual_storage)
            .map(|vs| vs.storages.as_slice())
            .unwrap_or_default();
        let recorded = self.store.assignments(repository_id).await?;
        let explicit = !recorded.is_empty();
        let assigned: Vec<String> = recorded
            .into_iter()
            .filter(|s| configured.contains(s))
            .collect();
        let storages = if assigned.is_empty() {
            configured.to_vec()
        } else {
            assigned
        };
        Ok((storages, explicit))
    }
}

/// Where a repository created next to another one goes.
struct Placement {
    primary: String,
    /// The other assigned storages.
    others: Vec<String>,
    /// The neighbour's storages at its latest generation.
    consistent: Vec<String>,
    /// Whether the neighbour has explicit assignments (then so does the new repository).
    explicit: bool,
    neighbour: Neighbour,
}

/// The repository a new one is placed next to: the annotated additional repository (a
/// pool's origin), else CreateFork's source, else the partitioning hint.
fn neighbour(request: &WriteRequest) -> Option<(RepositoryRef, NeighbourSource)> {
    if let Some(other) = &request.additional {
        return Some((other.clone(), NeighbourSource::AdditionalRepository));
    }
    if let Some(source) = request
        .fork_source
        .as_ref()
        .filter(|source| !source.relative_path.is_empty())
    {
        return Some((source.clone(), NeighbourSource::ForkSource));
    }
    request.partitioning_hint.as_ref().map(|path| {
        (
            RepositoryRef {
                storage_name: request.repository.storage_name.clone(),
                relative_path: path.clone(),
            },
            NeighbourSource::PartitioningHint,
        )
    })
}

/// A random healthy primary and, with a replication factor, that many storages in all
/// (chosen at random); without one, every configured storage.
fn place_by_factor(
    virtual_storage: &VirtualStorage,
    healthy: &[String],
) -> Result<(String, Vec<String>), RoutingError> {
    let mut rng = rand::thread_rng();
    let primary = healthy
        .choose(&mut rng)
        .cloned()
        .ok_or(RoutingError::NoHealthyNodes)?;
    let mut others: Vec<String> = virtual_storage
        .storages
        .iter()
        .filter(|s| **s != primary)
        .cloned()
        .collect();
    let factor = virtual_storage.default_replication_factor;
    if factor > 0 {
        others.shuffle(&mut rng);
        others.truncate(usize::try_from(factor - 1).unwrap_or(0));
    }
    Ok((primary, others))
}

/// An additional repository must be on the target's virtual storage and name a path.
fn check_additional(target: &RepositoryRef, other: &RepositoryRef) -> Result<(), RoutingError> {
    if other.storage_name != target.storage_name {
        return Err(RoutingError::DifferentVirtualStorages);
    }
    check_relative_path(&other.relative_path)
}

/// A relative path must be set, and be valid (see `relative_path`).
pub fn check_relative_path(path: &str) -> Result<(), RoutingError> {
    if path.is_empty() {
        return Err(RoutingError::RelativePathNotSet);
    }
    Ok(relative_path::validate(path)?)
}
