//! Which cameras each pipeline tracks. Every camera costs memory (a queue and its worker, a
//! tile on the board, metric label sets), and camera ids come from outside (an MQTT topic
//! level, `?camera=`, a Dapr event's `subject`), so a pipeline tracks at most
//! [`MAX_CAMERAS`]. A camera silent for the pipeline's `camera_idle` gives its place up to a
//! new one; only when every place is held by a camera heard from recently is a new one refused.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Cameras one pipeline tracks at most.
pub const MAX_CAMERAS: usize = 256;

#[derive(Default)]
pub struct Cameras {
    seen: Mutex<HashMap<String, HashMap<String, Instant>>>,
}

impl Cameras {
    /// Cameras `pipeline` heard from before this set was made (the board outlives reloads),
    /// each with how long ago: they hold their places, and give them up when idle, as if
    /// this set had seen them itself.
    pub fn seed(&self, pipeline: &str, cameras: impl IntoIterator<Item = (String, Duration)>) {
        let now = Instant::now();
        let mut seen = self.seen.lock().expect("cameras lock");
        let cams = seen.entry(pipeline.to_string()).or_default();
        for (camera, ago) in cameras.into_iter().take(MAX_CAMERAS) {
            cams.insert(camera, now.checked_sub(ago).unwrap_or(now));
        }
    }

    /// Notes a frame from `camera`. `Some(pruned)` if it may enter (`pruned`: idle cameras
    /// that gave their place up, for the caller to forget); `None` if the pipeline is full.
    /// `busy` says whether a camera still has frames waiting (it is never pruned then).
    pub fn admit(
        &self,
        pipeline: &str,
        camera: &str,
        idle: Duration,
        busy: impl Fn(&str) -> bool,
    ) -> Option<Vec<String>> {
        let mut seen = self.seen.lock().expect("cameras lock");
        let cams = seen.entry(pipeline.to_string()).or_default();
        let now = Instant::now();
        if let Some(last) = cams.get_mut(camera) {
            *last = now;
            return Some(Vec::new());
        }
        let mut pruned = Vec::new();
        if cams.len() >= MAX_CAMERAS {
            pruned = cams
                .iter()
                .filter(|(c, last)| now.duration_since(**last) >= idle && !busy(c))
                .map(|(c, _)| c.clone())
                .collect();
            for c in &pruned {
                cams.remove(c);
            }
            if cams.len() >= MAX_CAMERAS {
                return None;
            }
        }
        cams.insert(camera.to_string(), now);
        Some(pruned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_pipeline_refuses_until_a_camera_goes_idle() {
        let c = Cameras::default();
        for i in 0..MAX_CAMERAS {
            assert_eq!(c.admit("p", &format!("c{i}"), Duration::from_secs(60), |_| false), Some(vec![]));
        }
        assert_eq!(c.admit("p", "new", Duration::from_secs(60), |_| false), None);
        assert_eq!(c.admit("other", "new", Duration::from_secs(60), |_| false), Some(vec![]));
        assert_eq!(c.admit("p", "c0", Duration::from_secs(60), |_| false), Some(vec![]), "a known camera enters");
        // Idle right away: every camera but a busy one gives its place up.
        let pruned = c.admit("p", "new", Duration::ZERO, |cam| cam == "c1").unwrap();
        assert_eq!(pruned.len(), MAX_CAMERAS - 1);
        assert!(!pruned.contains(&"c1".to_string()));
    }

    /// A reload's new set started empty while the board kept every old tile: cameras from
    /// before a reload were never pruned, and tiles piled up. Seeded, they are.
    #[test]
    fn cameras_from_before_a_reload_hold_and_give_up_their_places() {
        let c = Cameras::default();
        let old = (0..MAX_CAMERAS).map(|i| (format!("old{i}"), Duration::from_secs(3600)));
        c.seed("p", old);
        assert_eq!(c.admit("p", "new", Duration::from_secs(7200), |_| false), None, "seeded cameras hold their places");
        let pruned = c.admit("p", "new", Duration::from_secs(600), |_| false).unwrap();
        assert_eq!(pruned.len(), MAX_CAMERAS, "idle seeded cameras give their places up");
    }
}
