//! What the controller wrote last, ahead of its watch cache.
//!
//! Decisions that span several objects (the reservations on one server, the owners of public
//! ports) must be made on what was already decided, not on what the watch cache has caught up
//! with: a pass that ran on a cache missing the previous pass's writes could hand the same
//! memory or port out twice. Each pass therefore reads "written value if newer, else cached
//! value". The controller is the only writer of these fields (leader election), so its own last
//! write is the truth until the cache shows it.

use std::collections::HashMap;
use std::sync::Mutex;

/// Last-written values by object uid.
#[derive(Debug)]
pub struct Overlay<V> {
    written: Mutex<HashMap<String, V>>,
}

impl<V> Default for Overlay<V> {
    fn default() -> Self {
        Overlay {
            written: Mutex::new(HashMap::new()),
        }
    }
}

impl<V: Clone + PartialEq> Overlay<V> {
    /// The effective value: the last write while the cache has not caught up, else the cached
    /// value. A cache that shows the written value retires the entry.
    pub fn effective(&self, uid: &str, cached: V) -> V {
        let mut written = self.written.lock().expect("overlay lock");
        match written.get(uid) {
            Some(value) if *value == cached => {
                written.remove(uid);
                cached
            }
            Some(value) => value.clone(),
            None => cached,
        }
    }

    /// Records a successful write.
    pub fn record(&self, uid: &str, value: V) {
        self.written
            .lock()
            .expect("overlay lock")
            .insert(uid.to_string(), value);
    }

    /// Drops entries of objects that no longer exist.
    pub fn retain_live(&self, live: &std::collections::HashSet<String>) {
        self.written
            .lock()
            .expect("overlay lock")
            .retain(|uid, _| live.contains(uid));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_value_wins_until_the_cache_shows_it() {
        let overlay = Overlay::default();
        assert_eq!(overlay.effective("a", 1), 1);
        overlay.record("a", 5);
        assert_eq!(overlay.effective("a", 1), 5, "stale cache");
        assert_eq!(overlay.effective("a", 5), 5, "cache caught up");
        assert_eq!(
            overlay.effective("a", 7),
            7,
            "entry retired: cache is the truth again"
        );
    }

    #[test]
    fn dead_objects_are_forgotten() {
        let overlay = Overlay::default();
        overlay.record("a", 1);
        overlay.record("b", 2);
        overlay.retain_live(&["b".to_string()].into_iter().collect());
        assert_eq!(overlay.effective("a", 0), 0);
        assert_eq!(overlay.effective("b", 0), 2);
    }
}
