//! The shared gitnode harness lives with the workspace's tests.
#[path = "../../../tests/common/gitnode.rs"]
mod gitnode;
pub use gitnode::*;
