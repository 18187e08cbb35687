//! Rules that depend on which RPC a call is: how it is routed, which RPCs create
//! repositories, which reads must come from the primary.

use super::error::RoutingError;
use super::registry::{MethodInfo, OpType, Scope};

/// How a call is routed, from its registry entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallKind {
    /// A read addressed to a virtual storage: any healthy node.
    StorageAccessor,
    /// A read of a repository: an up-to-date healthy replica.
    Accessor,
    /// A write to a repository (or its creation): the primary.
    Mutator,
    /// Housekeeping of a repository: every healthy assigned replica.
    Maintenance,
}

/// The RPCs that create a repository (change type "create").
const CREATE_METHODS: &[&str] = &[
    "/gitaly.RepositoryService/CreateRepository",
    "/gitaly.RepositoryService/CreateRepositoryFromURL",
    "/gitaly.RepositoryService/CreateRepositoryFromBundle",
    "/gitaly.RepositoryService/CreateRepositoryFromSnapshot",
    CREATE_FORK,
    "/gitaly.RepositoryService/ReplicateRepository",
    "/gitaly.RepositoryService/RestoreRepository",
    "/gitaly.ObjectPoolService/CreateObjectPool",
];

/// CreateFork: its source repository is not annotated, but a fork is placed next to it.
pub const CREATE_FORK: &str = "/gitaly.RepositoryService/CreateFork";

/// Creations that update the repository instead when it exists already.
const UPSERT_METHODS: &[&str] = &[
    "/gitaly.RepositoryService/ReplicateRepository",
    "/gitaly.RepositoryService/RestoreRepository",
];

/// Reads whose answer must come from the primary (sizes differ between replicas).
const FORCED_PRIMARY_METHODS: &[&str] = &[
    "/gitaly.RepositoryService/RepositorySize",
    "/gitaly.RepositoryService/GetObjectDirectorySize",
];

/// The 43 repository-scoped mutators that run as reference transactions: sent to the primary
/// and every up-to-date healthy secondary, which vote on their reference updates. Every
/// repository-scoped mutator but the two in [`NON_TRANSACTIONAL_MUTATORS`].
const TRANSACTIONAL_METHODS: &[&str] = &[
    "/gitaly.CleanupService/ApplyBfgObjectMapStream",
    "/gitaly.CleanupService/RewriteHistory",
    "/gitaly.CommitService/CommitLanguages",
    "/gitaly.ConflictsService/ResolveConflicts",
    "/gitaly.HookService/ProcReceiveHook",
    "/gitaly.ObjectPoolService/LinkRepositoryToObjectPool",
    "/gitaly.ObjectPoolService/DisconnectGitAlternates",
    "/gitaly.ObjectPoolService/FetchIntoObjectPool",
    "/gitaly.OperationService/UserCreateBranch",
    "/gitaly.OperationService/UserUpdateBranch",
    "/gitaly.OperationService/UserDeleteBranch",
    "/gitaly.OperationService/UserCreateTag",
    "/gitaly.OperationService/UserDeleteTag",
    "/gitaly.OperationService/UserMergeToRef",
    "/gitaly.OperationService/UserRebaseToRef",
    "/gitaly.OperationService/UserMergeBranch",
    "/gitaly.OperationService/UserFFBranch",
    "/gitaly.OperationService/UserCherryPick",
    "/gitaly.OperationService/UserCommitFiles",
    "/gitaly.OperationService/UserRebaseConfirmable",
    "/gitaly.OperationService/UserRevert",
    "/gitaly.OperationService/UserSquash",
    "/gitaly.OperationService/UserApplyPatch",
    "/gitaly.OperationService/UserUpdateSubmodule",
    "/gitaly.RefService/UpdateReferences",
    "/gitaly.RefService/DeleteRefs",
    "/gitaly.RepositoryService/FetchRemote",
    "/gitaly.RepositoryService/CreateRepository",
    "/gitaly.RepositoryService/FetchSourceBranch",
    "/gitaly.RepositoryService/WriteRef",
    "/gitaly.RepositoryService/CreateFork",
    "/gitaly.RepositoryService/CreateRepositoryFromURL",
    "/gitaly.RepositoryService/FetchBundle",
    "/gitaly.RepositoryService/CreateRepositoryFromBundle",
    "/gitaly.RepositoryService/CreateRepositoryFromSnapshot",
    "/gitaly.RepositoryService/RestoreCustomHooks",
    "/gitaly.RepositoryService/SetCustomHooks",
    "/gitaly.RepositoryService/RemoveRepository",
    "/gitaly.RepositoryService/ReplicateRepository",
    "/gitaly.RepositoryService/RestoreRepository",
    "/gitaly.RepositoryService/MigrateReferenceBackend",
    "/gitaly.SmartHTTPService/PostReceivePack",
    "/gitaly.SSHService/SSHReceivePack",
];

/// Repository-scoped mutators that go to the primary alone and reach the other replicas by
/// replication.
const NON_TRANSACTIONAL_MUTATORS: &[&str] = &[
    "/gitaly.ObjectPoolService/CreateObjectPool",
    "/gitaly.ObjectPoolService/DeleteObjectPool",
];

/// The value of `gitaly-route-repository-accessor-policy` that asks for the primary.
pub const PRIMARY_ONLY_POLICY: &[u8] = b"primary-only";

/// How `method` is routed, or why it cannot be.
pub fn call_kind(method: &MethodInfo) -> Result<CallKind, RoutingError> {
    match (method.scope, method.op_type) {
        (Scope::Repository, OpType::Accessor) => Ok(CallKind::Accessor),
        (Scope::Repository, OpType::Mutator) => Ok(CallKind::Mutator),
        (Scope::Repository, OpType::Maintenance) => Ok(CallKind::Maintenance),
        (Scope::Repository, other) => Err(RoutingError::UnsupportedOpType(other)),
        (Scope::Storage, OpType::Accessor) => Ok(CallKind::StorageAccessor),
        (Scope::Storage, _) => Err(RoutingError::StorageScopedMutator),
        (Scope::Partition, _) => Err(RoutingError::PartitionScoped),
        (Scope::None, _) => Err(RoutingError::Unscoped),
    }
}

/// Whether `method` creates a repository.
pub fn creates_repository(method: &MethodInfo) -> bool {
    CREATE_METHODS.contains(&method.full_name.as_str())
}

/// Whether `method` updates the repository when it exists instead of failing.
pub fn upserts(method: &MethodInfo) -> bool {
    UPSERT_METHODS.contains(&method.full_name.as_str())
}

/// Whether a read must go to the repository's primary: the method needs it, or the client
/// asked for it with the accessor-policy metadata.
pub fn forces_primary(method: &MethodInfo, accessor_policy: Option<&[u8]>) -> bool {
    FORCED_PRIMARY_METHODS.contains(&method.full_name.as_str())
        || accessor_policy == Some(PRIMARY_ONLY_POLICY)
}

/// Whether `method` runs as a reference transaction.
pub fn is_transactional(method: &MethodInfo) -> bool {
    TRANSACTIONAL_METHODS.contains(&method.full_name.as_str())
}

/// The startup check that the registry and the list of transactional RPCs agree: every
/// repository-scoped mutator is either transactional or one of the known exceptions, and
/// every listed RPC is a repository-scoped mutator. A new mutator in the protocol must be
/// classified before the router runs, or writes through it would skip voting unnoticed.
pub fn check_transactional(
    methods: impl IntoIterator<Item = &'static MethodInfo>,
) -> Result<(), String> {
    let mut problems = Vec::new();
    let mut listed: Vec<&str> = TRANSACTIONAL_METHODS.to_vec();
    listed.extend(NON_TRANSACTIONAL_MUTATORS);
    for method in methods {
        let name = method.full_name.as_str();
        let is_mutator = method.scope == Scope::Repository && method.op_type == OpType::Mutator;
        match (is_mutator, listed.iter().position(|n| *n == name)) {
            (true, Some(i)) => {
                listed.remove(i);
            }
            (true, None) => problems.push(format!(
                "mutator {name} is not classified as transactional or not"
            )),
            (false, Some(_)) => {
                problems.push(format!("{name} is listed as a mutator but is not one"))
            }
            (false, None) => {}
        }
    }
    problems.extend(
        listed
            .iter()
            .map(|name| format!("{name} is listed but not in the registry")),
    );
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::registry::Registry;

    fn method(name: &str) -> &'static MethodInfo {
        Registry::global().lookup(name).expect(name)
    }

    #[test]
    fn call_kinds_follow_scope_and_operation_type() {
        let cases = [
            (
                "/gitaly.RefService/FindDefaultBranchName",
                Ok(CallKind::Accessor),
            ),
            ("/gitaly.RepositoryService/WriteRef", Ok(CallKind::Mutator)),
            (
                "/gitaly.RepositoryService/OptimizeRepository",
                Ok(CallKind::Maintenance),
            ),
            (
                "/gitaly.RemoteService/FindRemoteRepository",
                Ok(CallKind::StorageAccessor),
            ),
            ("/gitaly.ServerService/ServerInfo", Err("rpc without scope")),
        ];
        for (name, want) in cases {
            let got = call_kind(method(name)).map_err(|e| e.to_string());
            assert_eq!(got, want.map_err(str::to_string), "{name}");
        }
    }

    #[test]
    fn forced_primary_by_method_or_policy() {
        let size = method("/gitaly.RepositoryService/RepositorySize");
        let read = method("/gitaly.RefService/FindDefaultBranchName");
        let cases: [(&MethodInfo, Option<&[u8]>, bool); 5] = [
            (size, None, true),
            (read, None, false),
            (read, Some(b"primary-only"), true),
            (read, Some(b"primary"), false),
            (read, Some(b""), false),
        ];
        for (method, policy, want) in cases {
            assert_eq!(forces_primary(method, policy), want, "{}", method.full_name);
        }
    }

    #[test]
    fn creations_and_upserts_are_mutators() {
        for name in CREATE_METHODS {
            let info = method(name);
            assert!(creates_repository(info));
            assert_eq!(call_kind(info).ok(), Some(CallKind::Mutator), "{name}");
        }
        assert!(upserts(method(
            "/gitaly.RepositoryService/ReplicateRepository"
        )));
        assert!(!upserts(method(
            "/gitaly.RepositoryService/CreateRepository"
        )));
    }

    #[test]
    fn the_registry_agrees_with_the_transactional_list() {
        assert_eq!(TRANSACTIONAL_METHODS.len(), 43);
        check_transactional(Registry::global().iter()).unwrap();
        assert!(is_transactional(method(
            "/gitaly.RepositoryService/WriteRef"
        )));
        assert!(is_transactional(method(
            "/gitaly.CommitService/CommitLanguages"
        )));
        assert!(!is_transactional(method(
            "/gitaly.ObjectPoolService/CreateObjectPool"
        )));
        // A registry missing a listed RPC, or with an unlisted mutator, fails the check.
        let some: Vec<&'static MethodInfo> = Registry::global()
            .iter()
            .filter(|m| m.method != "WriteRef")
            .collect();
        let err = check_transactional(some).unwrap_err();
        assert!(
            err.contains("WriteRef is listed but not in the registry"),
            "{err}"
        );
    }
}
