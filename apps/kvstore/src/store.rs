//! The in-memory key-value store.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

/// Longest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;

/// Values are shared (`Arc`) so a reader can stream one without holding the lock.
pub type Value = Arc<Vec<u8>>;

/// What [`KvStore::put`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    Created,
    Replaced,
}

/// Sizes reported by [`KvStore::stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreStats {
    pub keys: usize,
    /// Total size of all values, in bytes.
    pub bytes: u64,
}

/// A thread-safe map from UTF-8 keys to byte values.
#[derive(Debug, Default)]
pub struct KvStore {
    inner: RwLock<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<String, Value>,
    bytes: u64,
}

impl KvStore {
    pub fn new() -> Self {
        KvStore::default()
    }

    // A panic while holding the lock cannot leave the map inconsistent (every
    // mutation is a single insert/remove plus a counter update), so poisoning is
    // ignored rather than propagated.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stores `value` under `key`, replacing any previous value.
    pub fn put(&self, key: String, value: Vec<u8>) -> PutOutcome {
        let len = value.len() as u64;
        let mut inner = self.write();
        let previous = inner.map.insert(key, Arc::new(value));
        inner.bytes += len;
        match previous {
            Some(old) => {
                inner.bytes -= old.len() as u64;
                PutOutcome::Replaced
            }
            None => PutOutcome::Created,
        }
    }

    pub fn get(&self, key: &str) -> Option<Value> {
        self.read().map.get(key).cloned()
    }

    /// Removes `key`; `false` if it was absent.
    pub fn delete(&self, key: &str) -> bool {
        let mut inner = self.write();
        match inner.map.remove(key) {
            Some(old) => {
                inner.bytes -= old.len() as u64;
                true
            }
            None => false,
        }
    }

    /// Keys starting with `prefix`, sorted.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let mut keys: Vec<String> = self
            .read()
            .map
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        keys.sort_unstable();
        keys
    }

    pub fn stats(&self) -> StoreStats {
        let inner = self.read();
        StoreStats {
            keys: inner.map.len(),
            bytes: inner.bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_replace_delete() {
        let s = KvStore::new();
        assert_eq!(s.get("a"), None);
        assert_eq!(s.put("a".into(), b"one".to_vec()), PutOutcome::Created);
        assert_eq!(s.get("a").as_deref().map(Vec::as_slice), Some(&b"one"[..]));
        assert_eq!(s.put("a".into(), b"three".to_vec()), PutOutcome::Replaced);
        assert_eq!(s.stats(), StoreStats { keys: 1, bytes: 5 });
        assert!(s.delete("a"));
        assert!(!s.delete("a"));
        assert_eq!(s.stats(), StoreStats { keys: 0, bytes: 0 });
    }

    #[test]
    fn empty_values_are_values() {
        let s = KvStore::new();
        s.put("e".into(), Vec::new());
        assert_eq!(s.get("e").map(|v| v.len()), Some(0));
        assert_eq!(s.stats().keys, 1);
    }

    #[test]
    fn keys_are_sorted_and_filtered() {
        let s = KvStore::new();
        for k in ["b/2", "a", "b/1", "c"] {
            s.put(k.into(), vec![0]);
        }
        assert_eq!(s.keys(""), ["a", "b/1", "b/2", "c"]);
        assert_eq!(s.keys("b/"), ["b/1", "b/2"]);
        assert!(s.keys("z").is_empty());
    }

    #[test]
    fn byte_count_survives_concurrent_writers() {
        let s = Arc::new(KvStore::new());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let s = Arc::clone(&s);
                std::thread::spawn(move || {
                    for i in 0..200 {
                        let key = format!("k{}", i % 50);
                        s.put(key.clone(), vec![t; i % 7]);
                        if i % 3 == 0 {
                            s.delete(&key);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let expected: u64 = s
            .keys("")
            .iter()
            .filter_map(|k| s.get(k))
            .map(|v| v.len() as u64)
            .sum();
        assert_eq!(s.stats().bytes, expected);
    }
}
