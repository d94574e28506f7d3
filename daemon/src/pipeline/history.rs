//! A camera's last ten minutes for the page's sparklines: frames per second and latency, in
//! 10-second buckets in a fixed ring (no allocation per frame, a bounded 1.4 KB per camera).

use std::time::Instant;

/// Seconds per bucket.
pub const BUCKET_S: u64 = 10;
/// Buckets kept: ten minutes.
pub const BUCKETS: usize = 60;

#[derive(Clone, Copy, Default)]
struct Bucket {
    /// Which bucket since the board's start this slot holds; a slot from a lap ago is stale.
    index: u64,
    frames: u32,
    latency_ms: f64,
}

pub struct History {
    ring: [Bucket; BUCKETS],
}

impl Default for History {
    fn default() -> Self {
        History { ring: [Bucket::default(); BUCKETS] }
    }
}

/// The series the page draws, oldest first, one point per bucket.
pub struct Series {
    pub fps: Vec<f64>,
    /// Mean latency per bucket, `None` where no frame finished.
    pub latency_ms: Vec<Option<f64>>,
}

impl History {
    /// One result of a frame that took `latency_ms` from intake to commit, at `now`.
    pub fn record(&mut self, epoch: Instant, now: Instant, latency_ms: f64) {
        // Index 0 is never a real bucket's: a zeroed slot reads as empty.
        let index = now.duration_since(epoch).as_secs() / BUCKET_S + 1;
        let slot = &mut self.ring[(index % BUCKETS as u64) as usize];
        if slot.index != index {
            *slot = Bucket { index, frames: 0, latency_ms: 0.0 };
        }
        slot.frames += 1;
        slot.latency_ms += latency_ms;
    }

    pub fn series(&self, epoch: Instant, now: Instant) -> Series {
        let elapsed = now.duration_since(epoch);
        let current = elapsed.as_secs() / BUCKET_S + 1;
        // The bucket in progress is a rate over the seconds it has had, so the line moves as
        // frames arrive rather than once per bucket.
        let into_current = (elapsed.as_secs_f64() % BUCKET_S as f64).max(1.0);
        let mut series = Series { fps: Vec::with_capacity(BUCKETS), latency_ms: Vec::with_capacity(BUCKETS) };
        for back in (0..BUCKETS as u64).rev() {
            // Before the board's first bucket (index 0 or less) nothing happened.
            let index = current.checked_sub(back).unwrap_or(0);
            let b = self.ring[(index % BUCKETS as u64) as usize];
            let (frames, latency) = if index > 0 && b.index == index && b.frames > 0 {
                (b.frames as f64, Some(b.latency_ms / b.frames as f64))
            } else {
                (0.0, None)
            };
            let seconds = if index == current { into_current } else { BUCKET_S as f64 };
            series.fps.push((frames / seconds * 100.0).round() / 100.0);
            series.latency_ms.push(latency.map(|l| (l * 100.0).round() / 100.0));
        }
        series
    }
}

#[cfg(test)]
mod tests {
    use super::{BUCKET_S, BUCKETS, History};
    use std::time::{Duration, Instant};

    #[test]
    fn buckets_hold_rates_and_mean_latency_and_forget_after_ten_minutes() {
        let epoch = Instant::now();
        let at = |s: u64| epoch + Duration::from_secs(s);
        let mut h = History::default();
        // 20 frames in the first bucket (2 fps) at 5 ms, then 10 in the third at 7 ms.
        for _ in 0..20 {
            h.record(epoch, at(3), 5.0);
        }
        for _ in 0..10 {
            h.record(epoch, at(2 * BUCKET_S + 1), 7.0);
        }
        let s = h.series(epoch, at(3 * BUCKET_S));
        assert_eq!(s.fps.len(), BUCKETS);
        assert_eq!(&s.fps[BUCKETS - 4..], &[2.0, 0.0, 1.0, 0.0]);
        assert_eq!(&s.latency_ms[BUCKETS - 4..], &[Some(5.0), None, Some(7.0), None]);

        // Ten minutes on, the first bucket's slot is reused: its 20 frames must not count.
        h.record(epoch, at(BUCKETS as u64 * BUCKET_S + 3), 9.0);
        let s = h.series(epoch, at(BUCKETS as u64 * BUCKET_S + 3));
        assert_eq!(s.fps.iter().filter(|f| **f > 0.0).count(), 2, "{:?}", s.fps);
        assert_eq!(s.fps.last(), Some(&0.33));
        assert_eq!(s.latency_ms.last(), Some(&Some(9.0)));
    }

    #[test]
    fn the_bucket_in_progress_is_a_rate_over_its_seconds_so_far() {
        let epoch = Instant::now();
        let mut h = History::default();
        for _ in 0..4 {
            h.record(epoch, epoch + Duration::from_secs(1), 1.0);
        }
        // Two seconds into the bucket: 4 frames are 2 fps, not 0.4.
        let s = h.series(epoch, epoch + Duration::from_secs(2));
        assert_eq!(s.fps.last(), Some(&2.0));
    }
}
