//! Compiles our .proto files (proto/gitaly/*.proto) into Rust with prost and tonic. protox
//! parses them in-process, so building needs no `protoc` on the machine.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = PathBuf::from("proto");
    let mut files: Vec<PathBuf> = std::fs::read_dir(proto_dir.join("gitaly"))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "proto"))
        .collect();
    files.sort();
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(&files, [&proto_dir])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Services we only partly implement answer Unimplemented for the rest, as Gitaly would
        // for an RPC it does not know.
        .generate_default_stubs(true)
        .compile_fds(descriptors)?;
    Ok(())
}
