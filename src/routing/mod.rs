//! Routing decisions, as a module without I/O: which node serves a call and under which
//! replica path, and what to record after a write. The proxy reads the first request message
//! into a [`RepositoryRef`] (and friends), asks the [`Router`], and applies the plan it gets;
//! the router asks a [`RoutingStore`] (the read cache and the database in production, an
//! in-memory map in tests) and a [`HealthView`].

mod error;
pub mod methods;
mod plan;
pub mod registry;
pub mod relative_path;
mod replica_path;
mod router;
mod store;
mod topology;

#[cfg(test)]
mod tests;

pub use error::RoutingError;
pub use methods::CallKind;
pub use plan::{
    AccessorRoute, Creation, CreationRoute, MaintenanceRoute, MutatorRoute, Neighbour,
    NeighbourSource, RepositoryRef, StorageRoute, WriteRecord, WriteRoute,
};
pub use replica_path::{is_rails_pool_path, pool_replica_path, pool_repository_id, replica_path};
pub use router::{Router, WriteRequest};
pub use store::{HealthView, HealthySet, ReplicaSet, RoutingStore, StoreError};
pub use topology::{Topology, VirtualStorage};
