//! Running a plan: the open-loop scheduler or the closed-loop workers, the bounds (duration,
//! request count, cancellation), progress reports, and waiting for the last answers.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::Result;
use crate::endpoints::{self, Endpoints};
use crate::plan::{Drive, Plan};
use crate::profile::Schedule;
use crate::record::{Progress, Recorder, Summary};
use crate::send::Sender;

/// Beyond the request timeout, how long the end of a run waits for the last answers.
const DRAIN_MARGIN: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct Shared {
    sender: Sender,
    recorder: Recorder,
    start: Instant,
    max_requests: Option<u64>,
    /// Request numbers handed out (closed loop: one per request about to be sent).
    claimed: AtomicU64,
    /// Set when the run ends: nothing new is sent after it.
    stopped: AtomicBool,
}

impl Shared {
    /// The next request number, or `None` once `max_requests` are handed out.
    fn claim(&self) -> Option<u64> {
        let seq = self.claimed.fetch_add(1, Relaxed);
        match self.max_requests {
            Some(max) if seq >= max => None,
            _ => Some(seq),
        }
    }
}

/// Runs `plan` until its duration or request count is reached, or `cancel` completes; calls
/// `on_progress` every `plan.progress_interval` and once more at the end. Cancellation still
/// returns the summary of what was sent. Fails only on an invalid plan (every problem listed),
/// before sending anything.
///
/// Must be called within a Tokio runtime (requests are spawned onto it); a multi-threaded one
/// lets sending use every core.
pub async fn run<F, C>(plan: &Plan, mut on_progress: F, cancel: C) -> Result<Summary>
where
    F: FnMut(&Progress) + Send,
    C: Future<Output = ()> + Send,
{
    let bases = plan.validate()?;
    let endpoints = match &plan.endpoints {
        Some(e) => e.clone(),
        None => Endpoints::with(&bases)?,
    };
    let start = Instant::now();
    let shared = Arc::new(Shared {
        sender: Sender::new(plan, endpoints.clone(), start),
        recorder: Recorder::new(endpoints::MAX_TARGETS, plan.duration),
        start,
        max_requests: plan.max_requests,
        claimed: AtomicU64::new(0),
        stopped: AtomicBool::new(false),
    });
    // If the caller drops this future mid-run, the scheduler thread and the workers stop too.
    let _stop_on_drop = StopOnDrop(shared.clone());
    let in_flight = Arc::new(Semaphore::new(plan.max_in_flight));
    let mut drivers = JoinSet::new();
    let profile = match &plan.drive {
        Drive::OpenLoop(profile) => {
            let (shared, in_flight) = (shared.clone(), in_flight.clone());
            let schedule = Schedule::new(profile.clone(), plan.duration);
            let runtime = Handle::current();
            drivers.spawn_blocking(move || open_loop(&shared, schedule, &in_flight, &runtime));
            Some(profile.clone())
        }
        Drive::ClosedLoop { connections } => {
            for worker in 0..*connections {
                drivers.spawn(closed_loop(shared.clone(), worker as u64));
            }
            None
        }
    };
    let target_rate = |elapsed: Duration| profile.as_ref().map_or(0.0, |p| p.rate_at(elapsed));

    let deadline = start + plan.duration;
    let mut ticker =
        tokio::time::interval_at(start + plan.progress_interval, plan.progress_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rps = RateWindow::default();
    tokio::pin!(cancel);
    let mut cancelled = false;
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let elapsed = start.elapsed();
                let achieved = rps.update(elapsed, shared.recorder.total_sent());
                on_progress(&shared.recorder.progress(
                    elapsed,
                    plan.duration,
                    target_rate(elapsed),
                    achieved,
                ));
            }
            () = &mut cancel => {
                cancelled = true;
                break;
            }
            () = tokio::time::sleep_until(deadline) => break,
            next = drivers.join_next() => {
                if next.is_none() {
                    break;
                }
            }
        }
    }
    let stopped = start.elapsed().min(plan.duration);
    shared.stopped.store(true, Relaxed);

    // Wait for the answers still coming: every request carries its own timeout, so this ends.
    let drain = async {
        while drivers.join_next().await.is_some() {}
        let _ = in_flight.acquire_many(plan.max_in_flight as u32).await;
    };
    if tokio::time::timeout(plan.request_timeout + DRAIN_MARGIN, drain)
        .await
        .is_err()
    {
        drivers.abort_all();
    }
    shared.recorder.abandon_outstanding();
    let elapsed = start.elapsed();
    let achieved = rps.update(elapsed, shared.recorder.total_sent());
    on_progress(
        &shared
            .recorder
            .progress(stopped, plan.duration, target_rate(stopped), achieved),
    );
    Ok(shared
        .recorder
        .summary(&endpoints.known(), stopped, cancelled, |from, to| {
            profile.as_ref().map_or(0.0, |p| p.mean_rate(from, to))
        }))
}

/// The longest single sleep of the scheduler, so that it notices the end of the run quickly.
const MAX_NAP: Duration = Duration::from_millis(5);

/// Sends on the schedule's clock, never waiting for answers; latency counts from the due time.
///
/// Runs on a thread of its own: Tokio's timers fire on whole milliseconds, which would add up
/// to a millisecond of the generator's own lag to every request (the server answers in tens of
/// microseconds); the OS sleep wakes within tens of microseconds of the due time.
fn open_loop(
    shared: &Arc<Shared>,
    mut schedule: Schedule,
    in_flight: &Arc<Semaphore>,
    runtime: &Handle,
) {
    let mut seq = 0u64;
    while let Some(due) = schedule.next_due() {
        if shared.max_requests.is_some_and(|max| seq >= max) {
            return;
        }
        let when = shared.start + due;
        loop {
            if shared.stopped.load(Relaxed) {
                return;
            }
            let now = Instant::now();
            if when <= now {
                break;
            }
            std::thread::sleep((when - now).min(MAX_NAP));
        }
        match in_flight.clone().try_acquire_owned() {
            Ok(permit) => {
                shared.recorder.sent(due);
                let shared = shared.clone();
                let this = seq;
                seq += 1;
                runtime.spawn(async move {
                    shared
                        .sender
                        .request(&shared.recorder, this, this, due, when, true)
                        .await;
                    drop(permit);
                });
            }
            Err(_) => shared.recorder.missed(due),
        }
    }
}

/// One connection's worth of load (one stream's, over HTTP/2): the next request leaves when the
/// previous one is answered.
async fn closed_loop(shared: Arc<Shared>, worker: u64) {
    while !shared.stopped.load(Relaxed) {
        let Some(seq) = shared.claim() else { return };
        let sent_at = shared.start.elapsed();
        shared.recorder.sent(sent_at);
        shared
            .sender
            .request(
                &shared.recorder,
                seq,
                worker,
                sent_at,
                Instant::now(),
                false,
            )
            .await;
    }
}

/// Sets the stop flag when dropped: at the end of `run`, or when its future is dropped.
#[derive(Debug)]
struct StopOnDrop(Arc<Shared>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stopped.store(true, Relaxed);
    }
}

/// Requests per second over roughly the last second, from periodic samples of the sent count.
#[derive(Debug, Default)]
struct RateWindow {
    samples: VecDeque<(Duration, u64)>,
}

impl RateWindow {
    fn update(&mut self, now: Duration, sent: u64) -> f64 {
        if self.samples.is_empty() {
            self.samples.push_back((Duration::ZERO, 0));
        }
        self.samples.push_back((now, sent));
        while self.samples.len() > 2 && now - self.samples[1].0 >= Duration::from_secs(1) {
            self.samples.pop_front();
        }
        let (then, before) = self.samples[0];
        let span = (now - then).as_secs_f64();
        if span > 0.0 {
            (sent - before) as f64 / span
        } else {
            0.0
        }
    }
}
