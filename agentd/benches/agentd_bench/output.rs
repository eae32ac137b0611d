//! The table: its header, one row per measured figure, and the notes under it.

use crate::{ROUNDS, RUN, WARMUP};

pub fn print_header() {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let date = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "unknown".into());
    println!("agentd benchmarks (cargo bench -p agentd --bench agentd_bench)");
    println!("machine : {model}, {cpus} CPUs (nproc)");
    println!("date    : {date}");
    println!(
        "rates   : {:.1} s warm-up, then {:.1} s measured ((a): interleaved in {ROUNDS} slices)",
        WARMUP.as_secs_f64(),
        RUN.as_secs_f64()
    );
    println!();
    println!("{:<58} {:>16}  {:<10} met", "figure", "measured", "target");
    println!("{}", "-".repeat(92));
}

pub fn row(figure: &str, measured: String, target: &str, met: Option<bool>) {
    let met = match met {
        Some(true) => "yes",
        // The word the regression check greps for (docs/PERFORMANCE.md).
        Some(false) => "MISS",
        None => "",
    };
    println!("{figure:<58} {measured:>16}  {target:<10} {met}");
}

pub fn per_sec(rate: f64, unit: &str) -> String {
    format!("{rate:.0} {unit}/s")
}

/// The notes printed under the table.
pub fn print_notes() {
    println!();
    println!("MB = 10^6 bytes. (b) has one batch in flight. (c) and (d) each run a fresh");
    println!("node agent process (`agentd-node run`; (d) also `agentd node run`) on the same machine as the clients and the in-process");
    println!(
        "server; (c) clients are closed-loop (each sends its next call when the last returns)."
    );
}
