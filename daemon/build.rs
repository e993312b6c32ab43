//! Compiles proto/domkit/v1/domkit.proto with protox (a pure-Rust protobuf compiler: no
//! `protoc` on the build machine) and generates the tonic client and server from it.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/domkit/v1/domkit.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}
