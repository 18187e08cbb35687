//! The hand-made seeds of the corpus (`praefect-fuzz seed` writes them to
//! `fuzz/corpus/<target>/seed-*`): one well-formed input of each kind the parsers meet, from
//! which the mutator starts. Files the fuzzer added (`--grow`) sit beside them.

use std::time::{Duration, UNIX_EPOCH};

use praefect::proxy::frame::encode;
use praefect::wire::proto::{
    LinkRepositoryToObjectPoolRequest, ObjectPool, Repository, RepositoryExistsRequest,
    WalkReposRequest,
};
use praefect_wire::auth::sign_v2;
use prost::Message;

fn repository(storage: &str, path: &str) -> Repository {
    Repository {
        storage_name: storage.into(),
        relative_path: path.into(),
        gl_repository: "project-1".into(),
        gl_project_path: "group/project".into(),
        ..Default::default()
    }
}

fn text(name: &str, value: &str) -> (String, Vec<u8>) {
    (name.into(), value.as_bytes().to_vec())
}

/// The seeds of `target`, by file name.
pub fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    match target {
        "first_message" => {
            let exists = RepositoryExistsRequest {
                repository: Some(repository("default", "@hashed/ab/cd/abcd.git")),
            }
            .encode_to_vec();
            let link = LinkRepositoryToObjectPoolRequest {
                object_pool: Some(ObjectPool {
                    repository: Some(repository("default", "@pools/aa/bb/pool.git")),
                }),
                repository: Some(repository("default", "project.git")),
            }
            .encode_to_vec();
            let walk = WalkReposRequest {
                storage_name: "default".into(),
            }
            .encode_to_vec();
            let mut two = encode(&exists).to_vec();
            two.extend_from_slice(&encode(b"\x0a\x00"));
            vec![
                ("seed-repository-exists".into(), encode(&exists).to_vec()),
                ("seed-link-object-pool".into(), encode(&link).to_vec()),
                ("seed-walk-repos".into(), encode(&walk).to_vec()),
                ("seed-two-messages".into(), two),
                ("seed-empty-message".into(), encode(b"").to_vec()),
            ]
        }
        "message_counter" => {
            let mut stream = Vec::new();
            for message in [&b""[..], b"a", b"hello", &[7u8; 300]] {
                stream.extend_from_slice(&encode(message));
            }
            stream.extend_from_slice(&encode(b"unfinished")[..8]);
            vec![("seed-stream".into(), stream)]
        }
        "auth_header" => {
            let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
            let header = |secret: &[u8], at| {
                let mut input = vec![secret.len() as u8];
                input.extend_from_slice(secret);
                input.extend_from_slice(format!("Bearer {}", sign_v2(secret, at)).as_bytes());
                input
            };
            vec![
                ("seed-valid".into(), header(b"secret", now)),
                (
                    "seed-expired".into(),
                    header(b"secret", now - Duration::from_secs(31)),
                ),
                ("seed-basic".into(), b"\x06secretBasic dXNlcjpwYXNz".to_vec()),
            ]
        }
        "pktline" => vec![
            text("seed-data-and-flush", "0009hello0004000aworld0000"),
            text("seed-flush-only", "0000"),
            text("seed-no-flush", "0009hello"),
        ],
        "duration" => ["1h30m", "500ms", "-1.5s", "0", "2562047h47m16.854775807s", "3µs"]
            .iter()
            .enumerate()
            .map(|(i, d)| text(&format!("seed-{i}"), d))
            .collect(),
        "config" => vec![
            text(
                "seed-example",
                include_str!("../../config/praefect.example.toml"),
            ),
            text(
                "seed-minimal",
                "listen_addr = \"127.0.0.1:2305\"\n\n[[virtual_storage]]\nname = \"default\"\n\n\
                 [[virtual_storage.node]]\nstorage = \"gitaly-1\"\naddress = \"tcp://127.0.0.1:8075\"\n\
                 token = \"secret\"\n\n[database]\nhost = \"localhost\"\ndbname = \"praefect\"\n\n\
                 [failover]\nmonitor_interval = \"3s\"\n",
            ),
        ],
        // rewrite and auth_token read their input as instructions for a generator: their corpus
        // is what the fuzzer kept (`--grow`).
        _ => Vec::new(),
    }
}
