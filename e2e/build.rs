//! Compiles the lab's gRPC echo (`protos/labecho.proto`) with protox.

use std::error::Error;

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed=protos");
    let fds = protox::compile(["labecho.proto"], ["protos"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
