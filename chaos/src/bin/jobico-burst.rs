//! `jobico-burst`: the cluster path's burst benchmark (`scripts/bench-burst.sh`); see
//! `jobico_chaos::burst`.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = jobico_chaos::burst::BurstArgs::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("cannot start the async runtime");
    match runtime.block_on(jobico_chaos::burst::run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("burst: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
