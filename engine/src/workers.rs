//! A fixed set of long-lived threads that run the build's stage jobs.
//!
//! Long-lived because a processor started through `posix_spawn` gets a parent-death signal that
//! fires when the *thread* that spawned it exits, so the spawning threads must outlive the
//! processors. Not a rayon pool: between the short jobs of a build of many small stages, rayon's
//! idle workers spin and yield before they sleep (`sched_yield` was 3% of all samples of a
//! 1,000-stage build on 2 cores). Here an idle thread blocks: one waits on the queue, the others
//! on the lock in front of it.

use std::io;
use std::sync::{mpsc, Arc, Mutex};

type Job = Box<dyn FnOnce() + Send + 'static>;

/// The threads and the queue that feeds them. Dropping it closes the queue: each thread ends
/// once it finished the job it has (nothing waits for them, as with a rayon pool).
pub struct Workers {
    queue: mpsc::Sender<Job>,
}

impl Workers {
    /// Starts `count` threads named `NAME-0`, `NAME-1`, ...
    pub fn new(count: usize, name: &str) -> io::Result<Workers> {
        let (queue, jobs) = mpsc::channel::<Job>();
        let jobs = Arc::new(Mutex::new(jobs));
        for i in 0..count.max(1) {
            let jobs = Arc::clone(&jobs);
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || loop {
                    // The lock is held while waiting, so one idle thread waits on the queue and
                    // the others on the lock; it is released before the job runs.
                    let job = match jobs.lock() {
                        Ok(jobs) => jobs.recv(),
                        Err(_) => return,
                    };
                    match job {
                        // A panicking job aborts, as in a rayon pool: its stage would never report
                        // back, and the build would wait for it forever.
                        Ok(job) => {
                            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err()
                            {
                                std::process::abort();
                            }
                        }
                        Err(_) => return, // the queue closed
                    }
                })?;
        }
        Ok(Workers { queue })
    }

    /// Runs `job` on the first idle thread (queued until one is).
    pub fn spawn(&self, job: impl FnOnce() + Send + 'static) {
        // The threads end only when the queue closes, which `self` holds open.
        let _ = self.queue.send(Box::new(job));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_job_runs_once_on_a_named_thread_and_no_more_at_a_time_than_threads() {
        let workers = Workers::new(3, "test-worker").unwrap();
        let (done, results) = mpsc::channel();
        let running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (release, gate) = mpsc::channel::<()>();
        let gate = Arc::new(Mutex::new(gate));
        for i in 0..12 {
            let (done, running, most, gate) =
                (done.clone(), running.clone(), most.clone(), gate.clone());
            workers.spawn(move || {
                use std::sync::atomic::Ordering::SeqCst;
                let now = running.fetch_add(1, SeqCst) + 1;
                most.fetch_max(now, SeqCst);
                gate.lock().unwrap().recv().unwrap();
                running.fetch_sub(1, SeqCst);
                let name = std::thread::current().name().unwrap().to_string();
                done.send((i, name)).unwrap();
            });
        }
        for _ in 0..12 {
            release.send(()).unwrap();
        }
        let mut seen: Vec<(usize, String)> = results.iter().take(12).collect();
        seen.sort();
        assert_eq!(
            seen.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            (0..12).collect::<Vec<_>>()
        );
        assert!(seen
            .iter()
            .all(|(_, name)| name.starts_with("test-worker-")));
        assert!(most.load(std::sync::atomic::Ordering::SeqCst) <= 3);
    }
}
