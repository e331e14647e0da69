//! Indexes kept up to date by the watches, so a pass finds the objects it concerns without
//! scanning the cluster: the containers of one server, of one namespace.
//!
//! An index holds object references only; the objects themselves stay in the reflector store.
//! It is fed the same watch events as the store (relists included: what a relist does not
//! mention any more is dropped when the relist is done).

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use kube::Resource;
use kube::runtime::reflector::{ObjectRef, ObjectRefExtra};
use kube::runtime::watcher;

/// References to objects by the keys a function gives each of them.
pub struct Index<K: Resource<DynamicType = ()>> {
    keys_of: fn(&K) -> Vec<String>,
    state: Mutex<State<K>>,
}

/// One reference per object, shared by every place that holds it, without the uid and
/// resourceVersion a reference made from an object carries (neither is part of its identity):
/// at 50,000 containers the index is the largest cache after the store itself.
type SharedRef<K> = Arc<ObjectRef<K>>;

struct State<K: Resource<DynamicType = ()>> {
    /// Keys are shared too: many objects have the same (a namespace, a server).
    by_key: HashMap<Arc<str>, HashSet<SharedRef<K>>>,
    keys: HashMap<SharedRef<K>, Box<[Arc<str>]>>,
    /// The objects a relist in progress has mentioned so far.
    relisted: Option<HashSet<SharedRef<K>>>,
}

impl<K> Index<K>
where
    K: Resource<DynamicType = ()> + Clone,
    ObjectRef<K>: Hash + Eq,
{
    /// An empty index whose keys for an object are `keys_of(object)`.
    pub fn new(keys_of: fn(&K) -> Vec<String>) -> Self {
        Index {
            keys_of,
            state: Mutex::new(State {
                by_key: HashMap::new(),
                keys: HashMap::new(),
                relisted: None,
            }),
        }
    }

    /// Applies one watch event.
    pub fn observe(&self, event: &watcher::Event<K>) {
        let mut state = self.state.lock().expect("index");
        match event {
            watcher::Event::Init => state.relisted = Some(HashSet::new()),
            watcher::Event::InitApply(object) => {
                let reference = state.put(bare_ref(object), (self.keys_of)(object));
                if let Some(seen) = state.relisted.as_mut() {
                    seen.insert(reference);
                }
            }
            watcher::Event::InitDone => {
                if let Some(seen) = state.relisted.take() {
                    let gone: Vec<SharedRef<K>> = state
                        .keys
                        .keys()
                        .filter(|r| !seen.contains(*r))
                        .cloned()
                        .collect();
                    for reference in gone {
                        state.remove(&reference);
                    }
                }
            }
            watcher::Event::Apply(object) => {
                state.put(bare_ref(object), (self.keys_of)(object));
            }
            watcher::Event::Delete(object) => state.remove(&bare_ref(object)),
        }
    }

    /// The objects indexed under `key`.
    pub fn get(&self, key: &str) -> Vec<ObjectRef<K>> {
        let state = self.state.lock().expect("index");
        state
            .by_key
            .get(key)
            .map(|refs| refs.iter().map(|r| ObjectRef::clone(r)).collect())
            .unwrap_or_default()
    }
}

/// The reference to `object`: kind, namespace and name only.
pub(crate) fn bare_ref<K: Resource<DynamicType = ()>>(object: &K) -> ObjectRef<K> {
    let mut reference = ObjectRef::from_obj(object);
    reference.extra = ObjectRefExtra::default();
    reference
}

impl<K> State<K>
where
    K: Resource<DynamicType = ()>,
    ObjectRef<K>: Hash + Eq,
{
    /// Files `reference` under exactly `keys`; returns the shared reference.
    fn put(&mut self, reference: ObjectRef<K>, keys: Vec<String>) -> SharedRef<K> {
        if let Some((shared, filed)) = self.keys.get_key_value(&reference)
            && filed
                .iter()
                .map(|k| &**k)
                .eq(keys.iter().map(String::as_str))
        {
            return Arc::clone(shared);
        }
        self.remove(&reference);
        let shared = Arc::new(reference);
        let mut filed = Vec::with_capacity(keys.len());
        for key in keys {
            let key = match self.by_key.get_key_value(key.as_str()) {
                Some((interned, _)) => Arc::clone(interned),
                None => Arc::<str>::from(key),
            };
            self.by_key
                .entry(Arc::clone(&key))
                .or_default()
                .insert(Arc::clone(&shared));
            filed.push(key);
        }
        self.keys
            .insert(Arc::clone(&shared), filed.into_boxed_slice());
        shared
    }

    fn remove(&mut self, reference: &ObjectRef<K>) {
        let Some(keys) = self.keys.remove(reference) else {
            return;
        };
        for key in keys {
            if let Some(refs) = self.by_key.get_mut(&key) {
                refs.remove(reference);
                if refs.is_empty() {
                    self.by_key.remove(&key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;

    fn map(name: &str, key: &str) -> ConfigMap {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ns", "labels": {"k": key}}
        }))
        .unwrap()
    }

    fn label(map: &ConfigMap) -> Vec<String> {
        map.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("k"))
            .cloned()
            .into_iter()
            .collect()
    }

    fn names(index: &Index<ConfigMap>, key: &str) -> Vec<String> {
        let mut names: Vec<String> = index.get(key).into_iter().map(|r| r.name).collect();
        names.sort();
        names
    }

    #[test]
    fn follows_applies_moves_and_deletes() {
        let index = Index::new(label);
        index.observe(&watcher::Event::Apply(map("a", "x")));
        index.observe(&watcher::Event::Apply(map("b", "x")));
        assert_eq!(names(&index, "x"), ["a", "b"]);
        index.observe(&watcher::Event::Apply(map("a", "y")));
        assert_eq!(names(&index, "x"), ["b"]);
        assert_eq!(names(&index, "y"), ["a"]);
        index.observe(&watcher::Event::Delete(map("b", "x")));
        assert!(names(&index, "x").is_empty());
    }

    #[test]
    fn a_relist_drops_what_it_no_longer_mentions() {
        let index = Index::new(label);
        index.observe(&watcher::Event::Apply(map("a", "x")));
        index.observe(&watcher::Event::Apply(map("b", "x")));
        index.observe(&watcher::Event::Init);
        index.observe(&watcher::Event::InitApply(map("b", "x")));
        // Until the relist is complete, nothing is dropped.
        assert_eq!(names(&index, "x"), ["a", "b"]);
        index.observe(&watcher::Event::InitDone);
        assert_eq!(names(&index, "x"), ["b"]);
    }
}
