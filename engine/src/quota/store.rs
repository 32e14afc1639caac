//! Where bucket state lives: a key-value store with compare-and-swap, shaped
//! like proxy-wasm shared data (`get_shared_data` returns a CAS token,
//! `set_shared_data` fails with `CasMismatch`). The filter implements
//! [`BucketStore`] on shared data; [`MemoryStore`] reproduces Envoy's semantics
//! in memory for tests, benchmarks and `tenantgate simulate`.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::MAX_ATTEMPTS;

/// Why the store could not serve a quota decision.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The key changed since it was read (its CAS token differs).
    #[error("shared data changed since it was read (compare-and-swap mismatch)")]
    CasMismatch,
    /// Every attempt lost a compare-and-swap race.
    #[error("shared data is contended: gave up after {MAX_ATTEMPTS} attempts")]
    Contended,
    /// The store failed (a host error).
    #[error("shared data is unavailable: {0}")]
    Unavailable(String),
    /// A stored value did not decode.
    #[error("corrupt quota bucket: {0}")]
    Corrupt(String),
}

/// A key-value store with compare-and-swap, as proxy-wasm shared data offers.
pub trait BucketStore {
    /// The value of `key` and its CAS token, `None` if the key does not exist.
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError>;
    /// Stores `value` if `cas` is 0 or still the key's CAS token, else fails with
    /// [`StoreError::CasMismatch`]. A missing key is created whatever `cas` says.
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError>;
}

impl<S: BucketStore + ?Sized> BucketStore for &S {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        (**self).get(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        (**self).set(key, value, cas)
    }
}

impl<S: BucketStore + ?Sized> BucketStore for std::sync::Arc<S> {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        (**self).get(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        (**self).set(key, value, cas)
    }
}

/// An in-memory [`BucketStore`] with Envoy's shared-data semantics: one global
/// CAS counter, incremented on every successful set (skipping 0) and stored as
/// that key's token; a set on a missing key ignores `cas` and creates the key;
/// keys are never deleted. Thread-safe.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    cas_counter: u32,
    entries: HashMap<String, (Vec<u8>, u32), BuildHasherDefault<KeyHasher>>,
}

/// A fast hash for keys that come from the configuration (not from clients,
/// so flooding is no concern): FxHash's word-at-a-time multiply-rotate, as in
/// rustc. SipHash over the ~45-byte bucket keys was a large part of an admission.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct KeyHasher(u64);

impl KeyHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let mut word = [0u8; 8];
        for (w, b) in word.iter_mut().zip(chunks.remainder()) {
            *w = *b;
        }
        self.add(u64::from_le_bytes(word));
    }

    fn write_u8(&mut self, b: u8) {
        self.add(u64::from(b));
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Envoy's CAS counter: incremented on every successful set, skipping 0.
pub(crate) fn next_cas(counter: u32) -> u32 {
    match counter.wrapping_add(1) {
        0 => 1,
        n => n,
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere cannot leave `Inner` half-updated: every update is
        // a single insert. So a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every key with its value and CAS token, sorted by key.
    pub fn snapshot(&self) -> BTreeMap<String, (Vec<u8>, u32)> {
        self.lock()
            .entries
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The global CAS counter (the token the last successful set got).
    pub fn cas_counter(&self) -> u32 {
        self.lock().cas_counter
    }
}

impl BucketStore for MemoryStore {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        Ok(self.lock().entries.get(key).cloned())
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        match inner.entries.get_mut(key) {
            Some((_, current)) if cas != 0 && cas != *current => Err(StoreError::CasMismatch),
            Some((stored, current)) => {
                inner.cas_counter = next_cas(inner.cas_counter);
                stored.clear();
                stored.extend_from_slice(value);
                *current = inner.cas_counter;
                Ok(())
            }
            None => {
                inner.cas_counter = next_cas(inner.cas_counter);
                let token = inner.cas_counter;
                inner
                    .entries
                    .insert(key.to_owned(), (value.to_vec(), token));
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_store_has_envoy_semantics() {
        let s = MemoryStore::new();
        assert_eq!(s.get("a").unwrap(), None);
        // A missing key is created whatever the CAS says.
        s.set("a", b"1", 77).unwrap();
        let (v, cas_a) = s.get("a").unwrap().unwrap();
        assert_eq!((v.as_slice(), cas_a), (&b"1"[..], 1));
        // The counter is global: another key gets the next token.
        s.set("b", b"x", 0).unwrap();
        assert_eq!(s.get("b").unwrap().unwrap().1, 2);
        // A stale token fails, the right one succeeds, 0 always succeeds.
        assert_eq!(s.set("a", b"2", 2), Err(StoreError::CasMismatch));
        s.set("a", b"2", cas_a).unwrap();
        assert_eq!(s.set("a", b"3", cas_a), Err(StoreError::CasMismatch));
        s.set("a", b"3", 0).unwrap();
        assert_eq!(s.get("a").unwrap().unwrap(), (b"3".to_vec(), 4));
        assert_eq!(s.cas_counter(), 4);
        assert_eq!(s.len(), 2);
        assert_eq!(next_cas(u32::MAX), 1, "0 is never a token");
    }

    #[test]
    fn key_hasher_spreads_similar_keys() {
        use std::hash::BuildHasher;
        let h = BuildHasherDefault::<KeyHasher>::default();
        let keys: Vec<String> = (0..1000)
            .map(|i| format!("tenantgate:quota:v1:/acme/t{i}:rps:0000"))
            .collect();
        let hashes: std::collections::BTreeSet<u64> = keys.iter().map(|k| h.hash_one(k)).collect();
        assert_eq!(hashes.len(), keys.len());
    }

    #[test]
    fn store_errors_read_well() {
        assert_eq!(
            StoreError::Contended.to_string(),
            format!("shared data is contended: gave up after {MAX_ATTEMPTS} attempts")
        );
        assert_eq!(
            StoreError::Corrupt("x".into()).to_string(),
            "corrupt quota bucket: x"
        );
    }
}
