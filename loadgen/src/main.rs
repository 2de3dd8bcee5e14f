use std::process::ExitCode;

use clap::Parser;
use loadgen::Config;

fn main() -> ExitCode {
    let cfg = Config::parse();
    let threads = cfg.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(loadgen::run(cfg.clone()));
    // Clients were already told to stop; do not let a stuck socket hold the exit.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(report) => {
            print!("{}", report.to_text());
            if let Err(e) = loadgen::write_outputs(&cfg, &report) {
                eprintln!("loadgen: {e}");
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}
