//! The virtual storages routing chooses among, from the configuration.

use crate::config::Config;

/// One virtual storage: its storages in configuration order and its replication factor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtualStorage {
    pub name: String,
    pub storages: Vec<String>,
    /// 0: every storage holds every repository.
    pub default_replication_factor: i64,
}

/// Every configured virtual storage.
#[derive(Clone, Debug, Default)]
pub struct Topology {
    virtual_storages: Vec<VirtualStorage>,
}

impl Topology {
    pub fn new(virtual_storages: Vec<VirtualStorage>) -> Self {
        Topology { virtual_storages }
    }

    pub fn from_config(config: &Config) -> Self {
        Topology::new(
            config
                .virtual_storage
                .iter()
                .map(|vs| VirtualStorage {
                    name: vs.name.clone(),
                    storages: vs.node.iter().map(|n| n.storage.clone()).collect(),
                    default_replication_factor: vs.default_replication_factor,
                })
                .collect(),
        )
    }

    pub fn get(&self, name: &str) -> Option<&VirtualStorage> {
        self.virtual_storages.iter().find(|vs| vs.name == name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &VirtualStorage> {
        self.virtual_storages.iter()
    }
}
