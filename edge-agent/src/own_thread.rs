//! Tasks that get a thread of their own. The daemon's async runtime has one worker by default
//! (`[runtime] worker_threads`), shared by the lanes, the MQTT link and everything else; a task
//! that does much CPU work there stalls all of them. The MQTT router is one: while it decoded
//! and tracked a batch of tag reads, the link could not read (nor acknowledge) the next
//! messages, and RFID ingest reached ~0.7x a bare subscriber's rate; on a thread of its own the
//! link keeps reading while it works (`cargo bench -p e2e-tests --bench mqtt_ingest`).

use std::future::Future;

use tokio::sync::oneshot;

/// Runs `work` to completion on a new thread named `name`, in a single-threaded runtime with
/// timers. The receiver gets its output; it errs if the thread panicked or its runtime could
/// not be built (logged). `Err` when the thread cannot be started.
pub fn spawn<F>(name: &str, work: F) -> std::io::Result<oneshot::Receiver<F::Output>>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let (done, output) = oneshot::channel();
    let thread = name.to_owned();
    // The runtime is built on the new thread: one built here and dropped here, should the spawn
    // fail, would panic when this is called from async code (the daemon's start-up).
    std::thread::Builder::new().name(name.to_owned()).spawn(
        move || match tokio::runtime::Builder::new_current_thread().enable_time().build() {
            Ok(runtime) => {
                let _ = done.send(runtime.block_on(work));
            }
            Err(e) => tracing::error!(thread = %thread, error = %e, error_code = "THREAD_RUNTIME",
                "Cannot build the runtime of a thread; its work does not run"),
        },
    )?;
    Ok(output)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[tokio::test]
    async fn runs_the_work_on_its_own_thread_with_timers() {
        let caller = std::thread::current().id();
        let output = super::spawn("own-thread-test", async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            (std::thread::current().name().map(str::to_owned), std::thread::current().id() != caller)
        })
        .unwrap();
        assert_eq!(output.await.unwrap(), (Some("own-thread-test".to_owned()), true));
    }

    #[tokio::test]
    async fn a_panic_is_seen_by_the_receiver() {
        let output = super::spawn("own-thread-panic", async { panic!("on purpose") }).unwrap();
        assert!(output.await.is_err());
    }
}
