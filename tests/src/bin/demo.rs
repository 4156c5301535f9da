//! The one-command demo: `cargo run --release -p e2e-tests --bin demo [-- --dir PATH] [--clean]`.
//! Starts a cloud and two stores with simulated devices in this process, plays a short day,
//! prints what happens and a summary, and exits 0 only if every replica agrees.

use std::path::PathBuf;
use std::time::Duration;

use e2e_tests::demo::script::{run, Options};

const USAGE: &str = "usage: demo [--dir PATH] [--clean]
  --dir PATH  where the data folders go (a new or empty folder; default: a new folder under the temporary directory)
  --clean     remove the data folders at the end";

fn main() {
    let mut options = Options::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--dir" => match args.next() {
                Some(dir) => options.dir = Some(PathBuf::from(dir)),
                None => usage_error("--dir needs a path"),
            },
            "--clean" => options.clean = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return;
            }
            other => usage_error(&format!("unknown argument {other:?}")),
        }
    }
    // No tracing subscriber: the daemons' logs stay quiet so the narration reads plainly.
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
    // Ctrl-C is handled inside: the demo still stops everything and says where the data is.
    let code = runtime.block_on(run(options));
    // Whatever is left (device simulators' MQTT loops, the brokers' sockets) ends here.
    runtime.shutdown_timeout(Duration::from_secs(2));
    std::process::exit(code);
}

fn usage_error(message: &str) -> ! {
    eprintln!("demo: {message}\n{USAGE}");
    std::process::exit(64);
}
