//! Compiles the protocol files with `protox`, a pure-Rust protobuf compiler, so that a fresh
//! machine builds the workspace without a system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "workload.proto",
        "node.proto",
        "admin.proto",
        "agentd_workload.proto",
        "revocation.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    // The shared revocation messages first, on their own: the other packages refer to them
    // by crate path (extern_path below), so they are not generated twice.
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .compile_fds(protox::compile(["revocation.proto"], ["."])?)?;
    let descriptors = protox::compile(&files[..4], ["."])?;
    tonic_prost_build::configure()
        // Every package is included as one flat module (see src/lib.rs), so shared messages
        // are referred to by their crate path.
        .extern_path(".agentd.revocation.v1", "crate::revocation")
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
