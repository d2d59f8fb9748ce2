//! Invalidation of the per-process caches of keys and tokens.
//!
//! Every process caches unwrapped data keys and vault tokens; erasure destroys keys and
//! deletes vault rows. The `keystore_epoch` counter moves in the same transaction as any
//! destruction. A process reads the counter at most `interval` before it uses a cached value
//! and empties its caches when the counter moved, so an erasure takes effect in every process
//! within `interval` (one small query per interval per cache, only while the cache is used).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sqlx::PgPool;

fn guard<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Seen {
    epoch: Option<i64>,
    checked: Option<Instant>,
    generation: u64,
}

/// This process's view of the `keystore_epoch` counter.
pub(crate) struct Epoch {
    pool: PgPool,
    interval: Duration,
    seen: Mutex<Seen>,
}

impl Epoch {
    pub(crate) fn new(pool: PgPool, interval: Duration) -> Self {
        Self {
            pool,
            interval,
            seen: Mutex::new(Seen {
                epoch: None,
                checked: None,
                generation: 0,
            }),
        }
    }

    /// The cache generation valid now. Reads the counter when the last read started more
    /// than `interval` ago; the generation moves whenever the counter did.
    pub(crate) async fn generation(&self) -> Result<u64, sqlx::Error> {
        {
            let s = guard(&self.seen);
            if let Some(at) = s.checked {
                if at.elapsed() < self.interval {
                    return Ok(s.generation);
                }
            }
        }
        let started = Instant::now();
        let epoch: Option<(i64,)> = sqlx::query_as("SELECT epoch FROM keystore_epoch")
            .fetch_optional(&self.pool)
            .await?;
        let epoch = epoch.map_or(0, |(e,)| e);
        let mut s = guard(&self.seen);
        match s.epoch {
            Some(seen) if epoch <= seen => {}
            Some(_) => {
                s.epoch = Some(epoch);
                s.generation += 1;
            }
            None => s.epoch = Some(epoch),
        }
        if s.checked.is_none_or(|at| at < started) {
            s.checked = Some(started);
        }
        Ok(s.generation)
    }

    /// Moves the counter, inside the caller's transaction (the one destroying keys or
    /// deleting vault rows).
    pub(crate) async fn bump(tx: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE keystore_epoch SET epoch = epoch + 1")
            .execute(tx)
            .await?;
        Ok(())
    }
}

/// A bounded cache whose entries belong to one generation of the [`Epoch`]: a lookup in a
/// newer generation empties it, and a value read from the database under an older generation
/// is not kept (an erasure committed between the read and the insert would otherwise
/// survive in it).
pub(crate) struct Cache<K, V> {
    capacity: usize,
    inner: Mutex<(u64, HashMap<K, V>)>,
}

impl<K: Eq + Hash + Clone, V: Clone> Cache<K, V> {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            inner: Mutex::new((0, HashMap::new())),
        }
    }

    /// The cached values of `keys` in `generation`, and the keys that missed.
    pub(crate) fn get_many<'a>(
        &self,
        generation: u64,
        keys: impl IntoIterator<Item = &'a K>,
    ) -> (HashMap<K, V>, Vec<K>)
    where
        K: 'a,
    {
        let mut inner = guard(&self.inner);
        if generation > inner.0 {
            inner.1.clear();
            inner.0 = generation;
        }
        let mut hit = HashMap::new();
        let mut miss = Vec::new();
        if generation < inner.0 {
            // A caller that read the epoch before another saw it move: nothing cached now
            // belongs to its generation.
            return (hit, keys.into_iter().cloned().collect());
        }
        for k in keys {
            match inner.1.get(k) {
                Some(v) => {
                    hit.insert(k.clone(), v.clone());
                }
                None => miss.push(k.clone()),
            }
        }
        (hit, miss)
    }

    /// Keeps values read under `generation`, unless the generation moved meanwhile.
    pub(crate) fn put_many(&self, generation: u64, values: impl IntoIterator<Item = (K, V)>) {
        let mut inner = guard(&self.inner);
        if inner.0 != generation {
            return;
        }
        for (k, v) in values {
            if inner.1.len() >= self.capacity {
                inner.1.clear();
            }
            inner.1.insert(k, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_generation_empties_the_cache_and_refuses_older_reads() {
        let c: Cache<&str, u32> = Cache::new(10);
        c.put_many(0, [("a", 1)]);
        assert_eq!(c.get_many(0, [&"a"]).0.get("a"), Some(&1));
        let (hit, miss) = c.get_many(1, [&"a"]);
        assert!(hit.is_empty());
        assert_eq!(miss, vec!["a"]);
        c.put_many(0, [("a", 1)]);
        assert!(
            c.get_many(1, [&"a"]).0.is_empty(),
            "a read of generation 0 is not kept"
        );
        c.put_many(1, [("a", 2)]);
        assert_eq!(c.get_many(1, [&"a"]).0.get("a"), Some(&2));
        let (hit, miss) = c.get_many(0, [&"a"]);
        assert!(
            hit.is_empty() && miss == vec!["a"],
            "an older generation misses"
        );
        assert_eq!(
            c.get_many(1, [&"a"]).0.get("a"),
            Some(&2),
            "and leaves the cache as it is"
        );
    }

    #[test]
    fn the_cache_stays_within_its_capacity() {
        let c: Cache<u32, u32> = Cache::new(3);
        c.put_many(0, (0..10).map(|i| (i, i)));
        let (hit, _) = c.get_many(0, &(0..10).collect::<Vec<_>>());
        assert!(hit.len() <= 3);
        assert!(hit.contains_key(&9));
    }
}
