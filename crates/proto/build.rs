//! Compiles `proto/rrt/v1/*.proto` with protox (a pure-Rust protoc: nothing to install) and
//! generates the prost messages and tonic clients and servers, plus the encoded descriptor set
//! that server reflection serves.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = ["generation.proto", "worker.proto", "coordinator.proto"]
        .map(|f| root.join("rrt/v1").join(f));
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fds = protox::compile(&files, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("rrt_v1_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
