//! The check every relative path a client names goes through before the router records it,
//! looks it up or sends it to a node. A relative path is the key of the `repositories` table
//! and, for repositories tracked as they are on disk, a path under a node's storage root, so
//! only one spelling of a path inside the root is accepted: no `..`, no leading `/`, no empty
//! or `.` components (two spellings of one path would be two repositories), no NUL (which
//! PostgreSQL refuses in text), and nothing longer than a filesystem takes. Non-UTF-8 never
//! gets here: the first-message reader refuses a repository whose strings are not UTF-8.

/// The longest relative path accepted, in bytes: Linux's `PATH_MAX`. Any path the storage
/// root is prefixed to is longer still, so a longer one could not be opened on a node anyway.
pub const MAX_RELATIVE_PATH_BYTES: usize = 4096;
/// The longest component accepted, in bytes: Linux's `NAME_MAX`.
pub const MAX_COMPONENT_BYTES: usize = 255;

/// Why a relative path was refused. Client errors: the messages name no path (the client
/// knows which it sent), and carry none of its bytes into the log's message either.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidPath {
    #[error("relative path escapes root directory")]
    Escapes,
    #[error("relative path is absolute")]
    Absolute,
    #[error("relative path contains NUL")]
    Nul,
    #[error("relative path has an empty or \".\" component")]
    EmptyComponent,
    #[error("relative path is too long: {0} bytes, at most {MAX_RELATIVE_PATH_BYTES}")]
    TooLong(usize),
    #[error("relative path has a component longer than {MAX_COMPONENT_BYTES} bytes")]
    ComponentTooLong,
}

/// Checks a non-empty relative path (an empty one is "repository path not set", checked by
/// the caller with Praefect's message).
pub fn validate(path: &str) -> Result<(), InvalidPath> {
    if path.len() > MAX_RELATIVE_PATH_BYTES {
        return Err(InvalidPath::TooLong(path.len()));
    }
    if path.contains('\0') {
        return Err(InvalidPath::Nul);
    }
    if path.starts_with('/') {
        return Err(InvalidPath::Absolute);
    }
    for component in path.split('/') {
        match component {
            ".." => return Err(InvalidPath::Escapes),
            "" | "." => return Err(InvalidPath::EmptyComponent),
            long if long.len() > MAX_COMPONENT_BYTES => return Err(InvalidPath::ComponentTooLong),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_one_spelling_of_a_path_inside_the_root_passes() {
        for good in [
            "a.git",
            "@hashed/ab/cd/abcd.git",
            "@cluster/repositories/6b/86/1",
            "@pools/aa/bb/pool.git",
            "group/sub.group/..project.git",
            "a..b/c",
        ] {
            assert_eq!(validate(good), Ok(()), "{good:?}");
        }
        let long_component = "x".repeat(256);
        let long_path = "a/".repeat(2049);
        for (bad, why) in [
            ("..", InvalidPath::Escapes),
            ("../../x.git", InvalidPath::Escapes),
            ("a/../../b", InvalidPath::Escapes),
            ("a/..", InvalidPath::Escapes),
            ("/abs/x.git", InvalidPath::Absolute),
            ("/", InvalidPath::Absolute),
            ("a\0b", InvalidPath::Nul),
            ("a//b", InvalidPath::EmptyComponent),
            ("a/", InvalidPath::EmptyComponent),
            ("./a", InvalidPath::EmptyComponent),
            ("a/./b", InvalidPath::EmptyComponent),
            (long_component.as_str(), InvalidPath::ComponentTooLong),
            (long_path.as_str(), InvalidPath::TooLong(4098)),
        ] {
            assert_eq!(validate(bad), Err(why), "{bad:?}");
        }
        assert_eq!(validate(&"x".repeat(255)), Ok(()));
        assert_eq!(validate(&format!("{}b", "a/".repeat(2047))), Ok(()));
    }
}
