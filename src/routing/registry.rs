//! What the router knows about every Gitaly RPC: its operation type, its scope, whether it
//! streams, and where in the request message the target repository, the additional
//! repository and the storage name are (as field-number paths such as `1` or `1.1`).
//!
//! The facts come from `data/gitaly-rpcs.tsv` (a copy of the protocol's RPC table, one row per
//! RPC), compiled into the binary and parsed once.

use std::sync::LazyLock;

/// How an RPC affects a repository, which decides how it is routed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpType {
    Accessor,
    Mutator,
    Maintenance,
    /// Intercepted services carry no operation type.
    Unknown,
}

impl OpType {
    /// The `method_type` label of `gitaly_praefect_method_types`.
    pub fn metric_label(self) -> &'static str {
        match self {
            OpType::Accessor => "accessor",
            OpType::Mutator => "mutator",
            OpType::Maintenance => "maintenance",
            OpType::Unknown => "unknown",
        }
    }
}

/// What an RPC is addressed to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    Repository,
    Storage,
    Partition,
    /// Intercepted services.
    None,
}

/// A field-number path into a message, e.g. `[1, 1]` for `header.repository`.
pub type FieldPath = Vec<u32>;

/// One RPC of the registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MethodInfo {
    /// `/gitaly.RepositoryService/RepositoryExists`.
    pub full_name: String,
    pub service: String,
    pub method: String,
    pub op_type: OpType,
    pub scope: Scope,
    pub client_streaming: bool,
    pub server_streaming: bool,
    pub target_repository: Option<FieldPath>,
    pub additional_repository: Option<FieldPath>,
    pub storage: Option<FieldPath>,
    pub partition_id: Option<FieldPath>,
    /// Answered by the router itself (PraefectInfoService, ServerService, RefTransaction).
    pub intercepted: bool,
}

/// Why a registry row could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("RPC table line {line}: {message}")]
pub struct RegistryError {
    pub line: usize,
    pub message: String,
}

const RPC_TABLE: &str = include_str!("../../data/gitaly-rpcs.tsv");

/// The registry of every Gitaly RPC, by full method name.
pub struct Registry {
    methods: foldhash::HashMap<String, MethodInfo>,
}

// The table is compiled in and the unit tests below parse it, so parsing cannot fail in a
// built binary; without it no call could be routed, so there would be nothing to fall back to.
#[allow(clippy::expect_used)]
static REGISTRY: LazyLock<Registry> =
    LazyLock::new(|| Registry::parse(RPC_TABLE).expect("the compiled-in RPC table is valid"));

impl Registry {
    /// The registry compiled into the binary.
    pub fn global() -> &'static Registry {
        &REGISTRY
    }

    /// Looks up `/package.Service/Method`.
    pub fn lookup(&self, full_name: &str) -> Option<&MethodInfo> {
        self.methods.get(full_name)
    }

    pub fn len(&self) -> usize {
        self.methods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.methods.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &MethodInfo> {
        self.methods.values()
    }

    /// Parses the tab-separated RPC table (with its header line).
    pub fn parse(text: &str) -> Result<Registry, RegistryError> {
        let mut lines = text.lines().enumerate();
        let (_, header) = lines.next().ok_or(RegistryError {
            line: 1,
            message: "empty table".into(),
        })?;
        let columns: Vec<&str> = header.split('\t').collect();
        let column = |name: &str| {
            columns
                .iter()
                .position(|c| *c == name)
                .ok_or(RegistryError {
                    line: 1,
                    message: format!("missing column {name}"),
                })
        };
        let idx = Columns {
            service: column("service")?,
            method: column("method")?,
            client_streaming: column("client_streaming")?,
            server_streaming: column("server_streaming")?,
            op_type: column("op_type")?,
            scope: column("scope_level")?,
            target: column("target_repository_field")?,
            additional: column("additional_repository_field")?,
            storage: column("storage_field")?,
            partition: column("partition_id_field")?,
            intercepted: column("intercepted")?,
        };
        let mut methods = foldhash::HashMap::default();
        for (i, line) in lines {
            if line.trim().is_empty() {
                continue;
            }
            let info = parse_row(line, &idx).map_err(|message| RegistryError {
                line: i + 1,
                message,
            })?;
            methods.insert(info.full_name.clone(), info);
        }
        Ok(Registry { methods })
    }
}

struct Columns {
    service: usize,
    method: usize,
    client_streaming: usize,
    server_streaming: usize,
    op_type: usize,
    scope: usize,
    target: usize,
    additional: usize,
    storage: usize,
    partition: usize,
    intercepted: usize,
}

fn parse_row(line: &str, idx: &Columns) -> Result<MethodInfo, String> {
    let cells: Vec<&str> = line.split('\t').collect();
    let cell = |i: usize| cells.get(i).copied().unwrap_or("");
    let flag = |i: usize| match cell(i) {
        "1" => Ok(true),
        "0" | "" => Ok(false),
        other => Err(format!("expected 0 or 1, got {other:?}")),
    };
    let path = |i: usize| -> Result<Option<FieldPath>, String> {
        let text = cell(i);
        if text.is_empty() {
            return Ok(None);
        }
        text.split('.')
            .map(|n| {
                n.parse::<u32>()
                    .map_err(|_| format!("bad field path {text:?}"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    };
    let op_type = match cell(idx.op_type) {
        "ACCESSOR" => OpType::Accessor,
        "MUTATOR" => OpType::Mutator,
        "MAINTENANCE" => OpType::Maintenance,
        "UNKNOWN" | "" => OpType::Unknown,
        other => return Err(format!("unknown op_type {other:?}")),
    };
    let scope = match cell(idx.scope) {
        "REPOSITORY" => Scope::Repository,
        "STORAGE" => Scope::Storage,
        "PARTITION" => Scope::Partition,
        "" => Scope::None,
        other => return Err(format!("unknown scope {other:?}")),
    };
    let service = cell(idx.service).to_string();
    let method = cell(idx.method).to_string();
    if service.is_empty() || method.is_empty() {
        return Err("service and method are required".into());
    }
    Ok(MethodInfo {
        full_name: format!("/{service}/{method}"),
        service,
        method,
        op_type,
        scope,
        client_streaming: flag(idx.client_streaming)?,
        server_streaming: flag(idx.server_streaming)?,
        target_repository: path(idx.target)?,
        additional_repository: path(idx.additional)?,
        storage: path(idx.storage)?,
        partition_id: path(idx.partition)?,
        intercepted: flag(idx.intercepted)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_every_rpc_with_the_documented_counts() {
        let registry = Registry::global();
        assert_eq!(registry.len(), 168);
        let count = |op| registry.iter().filter(|m| m.op_type == op).count();
        assert_eq!(count(OpType::Accessor), 105);
        assert_eq!(count(OpType::Mutator), 49);
        assert_eq!(count(OpType::Maintenance), 2);
        assert_eq!(count(OpType::Unknown), 12);
        let scope = |s| registry.iter().filter(|m| m.scope == s).count();
        assert_eq!(scope(Scope::Repository), 141);
        assert_eq!(scope(Scope::Storage), 14);
        assert_eq!(scope(Scope::Partition), 1);
        assert_eq!(scope(Scope::None), 12);
    }

    #[test]
    fn every_row_is_consistent_with_the_lint_rules() {
        const UNROUTABLE_RAFT: &[&str] = &[
            "SendMessage",
            "SendSnapshot",
            "GetPartitions",
            "GetClusterInfo",
        ];
        for m in Registry::global().iter() {
            match m.scope {
                Scope::Repository => {
                    assert!(m.target_repository.is_some(), "{}", m.full_name);
                    assert!(m.storage.is_none(), "{}", m.full_name);
                }
                Scope::Storage
                    if m.service == "gitaly.RaftService"
                        && UNROUTABLE_RAFT.contains(&m.method.as_str()) =>
                {
                    assert!(m.storage.is_none(), "{}", m.full_name);
                }
                Scope::Storage => {
                    assert!(m.storage.is_some(), "{}", m.full_name);
                    assert!(m.target_repository.is_none(), "{}", m.full_name);
                }
                Scope::Partition => {
                    assert!(
                        m.storage.is_some() && m.partition_id.is_some(),
                        "{}",
                        m.full_name
                    );
                }
                Scope::None => {
                    assert!(m.intercepted, "{}", m.full_name);
                    assert_eq!(m.op_type, OpType::Unknown, "{}", m.full_name);
                }
            }
            if m.op_type == OpType::Maintenance {
                assert_eq!(m.scope, Scope::Repository, "{}", m.full_name);
            }
        }
    }

    #[test]
    fn looks_up_by_full_method_name() {
        let registry = Registry::global();
        let m = registry
            .lookup("/gitaly.ObjectPoolService/LinkRepositoryToObjectPool")
            .unwrap();
        assert_eq!(m.op_type, OpType::Mutator);
        assert_eq!(m.target_repository, Some(vec![2]));
        assert_eq!(m.additional_repository, Some(vec![1, 1]));
        let m = registry
            .lookup("/gitaly.SSHService/SSHReceivePack")
            .unwrap();
        assert!(m.client_streaming && m.server_streaming);
        let m = registry
            .lookup("/gitaly.RemoteService/FindRemoteRepository")
            .unwrap();
        assert_eq!(
            (m.scope, m.storage.clone()),
            (Scope::Storage, Some(vec![2]))
        );
        assert!(registry
            .lookup("/gitaly.RepositoryService/NoSuchMethod")
            .is_none());
    }

    #[test]
    fn malformed_tables_are_refused_with_the_line() {
        let header = "service\tmethod\tclient_streaming\tserver_streaming\top_type\tscope_level\ttarget_repository_field\tadditional_repository_field\tstorage_field\tpartition_id_field\tintercepted";
        let bad = format!("{header}\ngitaly.X\tY\t0\t0\tWRITER\tREPOSITORY\t1\t\t\t\t0\n");
        let err = Registry::parse(&bad).err().unwrap();
        assert_eq!(err.line, 2);
        let bad = format!("{header}\ngitaly.X\tY\t0\t0\tMUTATOR\tREPOSITORY\t1.x\t\t\t\t0\n");
        assert!(Registry::parse(&bad).is_err());
        assert!(Registry::parse("service\tmethod\n").is_err());
    }
}
