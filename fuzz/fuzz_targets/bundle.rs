//! libFuzzer target: see fuzz/bodies.rs for what it checks.
#![no_main]

#[path = "../bodies.rs"]
#[allow(dead_code)] // each target uses one body
mod bodies;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    bodies::bundle(data);
});
