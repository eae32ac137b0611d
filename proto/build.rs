//! Compiles the protocol files with `protox`, a pure-Rust protobuf compiler, so that a fresh
//! machine builds the workspace without a system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "workload.proto",
        "node.proto",
        "admin.proto",
        "agentd_workload.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["."])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
