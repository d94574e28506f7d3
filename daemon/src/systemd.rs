//! systemd integration: readiness, reload and stop notifications, human-readable STATUS lines,
//! and watchdog pings. Every call is a no-op outside systemd (no `NOTIFY_SOCKET`).

use std::time::Duration;

use sd_notify::NotifyState;

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!("sd_notify: {e}");
    }
}

/// Listeners are bound and functions loaded.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn reloading() {
    let mut states = vec![NotifyState::Reloading, NotifyState::Status("reloading configuration")];
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        states.push(now);
    }
    notify(&states);
}

pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("stopping: flushing the outbox")]);
}

pub fn status(line: &str) {
    notify(&[NotifyState::Status(line)]);
}

pub fn watchdog_ping() {
    notify(&[NotifyState::Watchdog]);
}

/// How often to check health: a third of `WatchdogSec=` when systemd set one, else 10 s.
pub fn health_interval() -> (Duration, bool) {
    let mut usec = 0u64;
    if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
        (Duration::from_micros(usec / 3), true)
    } else {
        (Duration::from_secs(10), false)
    }
}

/// Test builds only (`--features test-hooks`): SIGUSR1 wedges the health loop, so the
/// watchdog's restart can be shown on a real systemd.
#[cfg(feature = "test-hooks")]
pub async fn stall_requested() {
    let mut usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
        .expect("installing SIGUSR1 handler");
    usr1.recv().await;
    tracing::warn!("test hook: health loop stalled on SIGUSR1");
}

#[cfg(not(feature = "test-hooks"))]
pub async fn stall_requested() {
    std::future::pending::<()>().await
}
