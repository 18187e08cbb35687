//! What the administrative RPCs check requests against: the configured virtual storages and
//! their storages (the database may still name storages that were removed since).

use crate::proxy::error::{InvalidRequest, ProxyError};
use crate::proxy::state::Proxy;

/// The storages of a configured virtual storage; InvalidArgument naming it otherwise.
pub fn known_virtual_storage<'p>(proxy: &'p Proxy, name: &str) -> Result<&'p [String], ProxyError> {
    proxy
        .router
        .topology()
        .get(name)
        .map(|vs| vs.storages.as_slice())
        .ok_or_else(|| InvalidRequest::UnknownVirtualStorage(name.to_string()).into())
}

/// Every configured (virtual storage, storage), as the datastore's lookups take them.
pub fn configured_pairs(proxy: &Proxy) -> Vec<(String, String)> {
    crate::nodes::configured_pairs(&proxy.config)
}
