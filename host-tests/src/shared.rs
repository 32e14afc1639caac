//! Envoy's shared-data store, shared by every VM of one [`crate::Host`].
//!
//! Semantics copied from Envoy (`proxy-wasm-cpp-host`'s `SharedData`):
//! - one CAS counter for the whole store, starting at 1, incremented on every
//!   successful set (0 is skipped when it wraps); the new number becomes the
//!   key's CAS;
//! - `get` of a missing key is `NotFound`;
//! - `set` with CAS 0 is unconditional; on an existing key a non-zero CAS that
//!   differs from the stored one is `CasMismatch`; a set on a missing key ignores
//!   the CAS and creates the key (so two VMs can both "create" it);
//! - keys are never deleted.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use crate::abi::Status;

/// A fault the store injects, for tests of the filter's error paths.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum SharedDataFault {
    /// Behave like Envoy.
    #[default]
    None,
    /// Every conditional set (CAS != 0) on an existing key fails with `CasMismatch`.
    CasAlwaysMismatches,
    /// Every `get` of an existing key returns these bytes instead of the value
    /// (the CAS is the real one).
    GarbageValues(Vec<u8>),
    /// Every `get` returns this status (and no value).
    GetFails(Status),
    /// Every `set` returns this status (and changes nothing).
    SetFails(Status),
}

#[derive(Debug)]
struct Inner {
    entries: BTreeMap<Vec<u8>, (Vec<u8>, u32)>,
    next_cas: u32,
    fault: SharedDataFault,
    gets: u64,
    sets: u64,
    mismatches: u64,
}

/// The store. Thread-safe: VMs on different threads use it at once.
#[derive(Debug)]
pub struct SharedData {
    inner: Mutex<Inner>,
}

impl Default for SharedData {
    fn default() -> Self {
        SharedData {
            inner: Mutex::new(Inner {
                entries: BTreeMap::new(),
                next_cas: 1,
                fault: SharedDataFault::None,
                gets: 0,
                sets: 0,
                mismatches: 0,
            }),
        }
    }
}

/// Counters of store traffic, to show what the filter did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SharedDataStats {
    pub gets: u64,
    pub sets: u64,
    pub cas_mismatches: u64,
    pub keys: usize,
}

impl SharedData {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A test thread that panicked while holding the lock leaves the data
        // consistent (every update is a single assignment), so keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `proxy_get_shared_data`: the value and its CAS.
    pub fn get(&self, key: &[u8]) -> Result<(Vec<u8>, u32), Status> {
        let mut inner = self.lock();
        inner.gets += 1;
        match &inner.fault {
            SharedDataFault::GetFails(status) => return Err(*status),
            SharedDataFault::GarbageValues(garbage) => {
                let garbage = garbage.clone();
                return match inner.entries.get(key) {
                    Some((_, cas)) => Ok((garbage, *cas)),
                    None => Err(Status::NotFound),
                };
            }
            _ => {}
        }
        inner.entries.get(key).cloned().ok_or(Status::NotFound)
    }

    /// `proxy_set_shared_data`.
    pub fn set(&self, key: &[u8], value: &[u8], cas: u32) -> Result<(), Status> {
        let mut inner = self.lock();
        inner.sets += 1;
        let exists = inner.entries.contains_key(key);
        match &inner.fault {
            SharedDataFault::SetFails(status) => return Err(*status),
            SharedDataFault::CasAlwaysMismatches if exists && cas != 0 => {
                inner.mismatches += 1;
                return Err(Status::CasMismatch);
            }
            _ => {}
        }
        if let Some((_, stored)) = inner.entries.get(key) {
            if cas != 0 && cas != *stored {
                inner.mismatches += 1;
                return Err(Status::CasMismatch);
            }
        }
        let new_cas = inner.next_cas;
        inner.next_cas = inner.next_cas.wrapping_add(1);
        if inner.next_cas == 0 {
            inner.next_cas = 1;
        }
        inner
            .entries
            .insert(key.to_vec(), (value.to_vec(), new_cas));
        Ok(())
    }

    /// Turns a fault on (or off with [`SharedDataFault::None`]).
    pub fn set_fault(&self, fault: SharedDataFault) {
        self.lock().fault = fault;
    }

    pub fn fault(&self) -> SharedDataFault {
        self.lock().fault.clone()
    }

    /// Sets the next CAS number (to test wrap-around).
    pub fn set_next_cas(&self, cas: u32) {
        self.lock().next_cas = cas.max(1);
    }

    /// Every key, sorted.
    pub fn keys(&self) -> Vec<Vec<u8>> {
        self.lock().entries.keys().cloned().collect()
    }

    /// The stored value and CAS of a key, bypassing any fault.
    pub fn peek(&self, key: &[u8]) -> Option<(Vec<u8>, u32)> {
        self.lock().entries.get(key).cloned()
    }

    /// Replaces a stored value directly (keeps Envoy's CAS numbering), bypassing faults.
    pub fn poke(&self, key: &[u8], value: &[u8]) {
        let mut inner = self.lock();
        let cas = inner.next_cas;
        inner.next_cas = inner.next_cas.wrapping_add(1).max(1);
        inner.entries.insert(key.to_vec(), (value.to_vec(), cas));
    }

    pub fn stats(&self) -> SharedDataStats {
        let inner = self.lock();
        SharedDataStats {
            gets: inner.gets,
            sets: inner.sets,
            cas_mismatches: inner.mismatches,
            keys: inner.entries.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envoy_cas_semantics() {
        let s = SharedData::default();
        assert_eq!(s.get(b"k"), Err(Status::NotFound));
        // A set on a missing key ignores the CAS.
        s.set(b"k", b"a", 77).unwrap();
        assert_eq!(s.get(b"k").unwrap(), (b"a".to_vec(), 1));
        // The CAS counter is global.
        s.set(b"other", b"x", 0).unwrap();
        assert_eq!(s.get(b"other").unwrap().1, 2);
        assert_eq!(s.set(b"k", b"b", 2), Err(Status::CasMismatch));
        s.set(b"k", b"b", 1).unwrap();
        assert_eq!(s.get(b"k").unwrap(), (b"b".to_vec(), 3));
        // A stale CAS fails; CAS 0 is unconditional.
        assert_eq!(s.set(b"k", b"c", 1), Err(Status::CasMismatch));
        s.set(b"k", b"c", 0).unwrap();
        assert_eq!(s.get(b"k").unwrap(), (b"c".to_vec(), 4));
        assert_eq!(s.stats().cas_mismatches, 2);
    }

    #[test]
    fn cas_skips_zero_on_wrap() {
        let s = SharedData::default();
        s.set_next_cas(u32::MAX);
        s.set(b"a", b"1", 0).unwrap();
        s.set(b"b", b"1", 0).unwrap();
        assert_eq!(s.get(b"a").unwrap().1, u32::MAX);
        assert_eq!(s.get(b"b").unwrap().1, 1);
    }

    #[test]
    fn faults() {
        let s = SharedData::default();
        s.set(b"k", b"v", 0).unwrap();
        s.set_fault(SharedDataFault::CasAlwaysMismatches);
        assert_eq!(s.set(b"k", b"w", 1), Err(Status::CasMismatch));
        s.set(b"new", b"w", 5).unwrap();
        s.set_fault(SharedDataFault::GarbageValues(b"\xff\xfe".to_vec()));
        assert_eq!(s.get(b"k").unwrap(), (b"\xff\xfe".to_vec(), 1));
        assert_eq!(s.peek(b"k").unwrap().0, b"v");
        s.set_fault(SharedDataFault::GetFails(Status::InternalFailure));
        assert_eq!(s.get(b"k"), Err(Status::InternalFailure));
        s.set_fault(SharedDataFault::None);
        assert_eq!(s.get(b"k").unwrap().0, b"v");
    }

    #[test]
    fn concurrent_increments_lose_nothing() {
        let s = std::sync::Arc::new(SharedData::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        loop {
                            let (v, cas) = match s.get(b"n") {
                                Ok((v, cas)) => {
                                    (String::from_utf8(v).unwrap().parse::<u64>().unwrap(), cas)
                                }
                                Err(_) => (0, 0),
                            };
                            if s.set(b"n", (v + 1).to_string().as_bytes(), cas).is_ok() {
                                break;
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Racing creators can both "create" the key (Envoy's quirk), so at most a
        // few increments are lost at the start; afterwards CAS serializes them.
        let n: u64 = String::from_utf8(s.get(b"n").unwrap().0)
            .unwrap()
            .parse()
            .unwrap();
        assert!(n > 3990 && n <= 4000, "{n}");
    }
}
