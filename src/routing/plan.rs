//! Plans: what routing decided for one call. A plan names nodes by storage and replicas by
//! replica path; the proxy turns it into rewritten messages and forwarded calls, and records
//! what a write's plan says once the write succeeded.

/// A repository as a request names it: a virtual storage and a relative path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RepositoryRef {
    pub storage_name: String,
    pub relative_path: String,
}

/// A storage-scoped read: any healthy node of the virtual storage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageRoute {
    pub storage: String,
}

/// A read: one up-to-date healthy replica (or the primary, when forced).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessorRoute {
    pub storage: String,
    pub replica_path: String,
    /// The replica path of the additional repository the request names, if any.
    pub additional_replica_path: Option<String>,
}

/// A write to an existing repository.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MutatorRoute {
    pub repository: RepositoryRef,
    pub repository_id: i64,
    pub replica_path: String,
    pub additional_replica_path: Option<String>,
    pub primary: String,
    /// Assigned, up-to-date, locally healthy storages besides the primary: they can apply the
    /// write together with it (reference transactions).
    pub secondaries: Vec<String>,
    /// The other assigned storages (outdated or unhealthy): they catch up by replication.
    pub replication_targets: Vec<String>,
}

/// Where a new repository goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreationRoute {
    pub repository: RepositoryRef,
    pub repository_id: i64,
    pub replica_path: String,
    pub primary: String,
    /// Assigned, locally healthy storages (and, next to a neighbour, at its latest
    /// generation) besides the primary: they create the repository together with it.
    pub secondaries: Vec<String>,
    /// Assigned storages that get the repository by replication.
    pub replication_targets: Vec<String>,
    /// Whether the assignments are recorded (a replication factor is in force, or the
    /// neighbour has explicit assignments); otherwise every configured storage is assigned.
    pub store_assignments: bool,
    /// The repository it was placed next to, if any.
    pub neighbour: Option<Neighbour>,
}

/// A repository a new one is created next to, and how the request named it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub replica_path: String,
    pub named_by: NeighbourSource,
}

/// How a creation named the repository to place it next to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NeighbourSource {
    /// The annotated additional repository (an object pool's origin): rewritten too.
    AdditionalRepository,
    /// CreateFork's source repository (not annotated; the node reads it through Praefect).
    ForkSource,
    /// The `gitaly-partitioning-hint` metadata: rewritten to the neighbour's replica path.
    PartitioningHint,
}

/// A write: an update of an existing repository, or a creation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteRoute {
    Update(MutatorRoute),
    Create(CreationRoute),
}

/// A maintenance call: every assigned, locally healthy storage holding a replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaintenanceRoute {
    pub repository_id: i64,
    pub replica_path: String,
    pub storages: Vec<String>,
}

/// What to record once a write succeeded on the primary: who is at the new generation, who
/// needs a replication job, and, for a creation, the repository itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteRecord {
    pub repository: RepositoryRef,
    pub repository_id: i64,
    pub replica_path: String,
    pub primary: String,
    /// Secondaries that applied the write too.
    pub updated_secondaries: Vec<String>,
    /// Assigned storages left behind: each gets an `update` job from the primary.
    pub outdated: Vec<String>,
    /// Set for a creation: whether to record the assignments.
    pub created: Option<Creation>,
}

/// The creation part of a [`WriteRecord`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Creation {
    pub store_assignments: bool,
}

impl WriteRoute {
    /// The node the call goes to.
    pub fn primary(&self) -> &str {
        match self {
            WriteRoute::Update(route) => &route.primary,
            WriteRoute::Create(route) => &route.primary,
        }
    }

    /// The storages that take part in the write with the primary (future voters).
    pub fn secondaries(&self) -> &[String] {
        match self {
            WriteRoute::Update(route) => &route.secondaries,
            WriteRoute::Create(route) => &route.secondaries,
        }
    }

    /// The assigned storages that catch up by replication whatever happens.
    pub fn replication_targets(&self) -> &[String] {
        match self {
            WriteRoute::Update(route) => &route.replication_targets,
            WriteRoute::Create(route) => &route.replication_targets,
        }
    }

    /// The record of a write that `updated_secondaries` applied as well as the primary: every
    /// other secondary and every replication target is left outdated.
    pub fn record(&self, updated_secondaries: &[String]) -> WriteRecord {
        match self {
            WriteRoute::Update(route) => WriteRecord {
                repository: route.repository.clone(),
                repository_id: route.repository_id,
                replica_path: route.replica_path.clone(),
                primary: route.primary.clone(),
                updated_secondaries: updated_secondaries.to_vec(),
                outdated: route
                    .secondaries
                    .iter()
                    .filter(|s| !updated_secondaries.contains(s))
                    .chain(&route.replication_targets)
                    .cloned()
                    .collect(),
                created: None,
            },
            WriteRoute::Create(route) => WriteRecord {
                repository: route.repository.clone(),
                repository_id: route.repository_id,
                replica_path: route.replica_path.clone(),
                primary: route.primary.clone(),
                updated_secondaries: updated_secondaries.to_vec(),
                outdated: route
                    .secondaries
                    .iter()
                    .filter(|s| !updated_secondaries.contains(s))
                    .chain(&route.replication_targets)
                    .cloned()
                    .collect(),
                created: Some(Creation {
                    store_assignments: route.store_assignments,
                }),
            },
        }
    }
}
