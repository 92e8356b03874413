//! `jobico-chaos`: see the library documentation.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = jobico_chaos::Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("cannot start the async runtime");
    match runtime.block_on(jobico_chaos::run(args)) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(error) => {
            eprintln!("chaos: cannot run: {error:#}");
            std::process::ExitCode::from(2)
        }
    }
}
