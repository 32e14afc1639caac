//! Metrics as Envoy keeps them: per process, so every VM of a [`crate::Host`]
//! that defines a metric of a given name gets the same one.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use crate::abi::{MetricType, Status};

/// One metric's state.
#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    pub name: String,
    pub kind: MetricType,
    /// Counter or gauge value; for a histogram, the number of samples.
    pub value: u64,
    /// Histogram samples (the last [`HISTOGRAM_SAMPLES`] recorded).
    pub samples: Vec<u64>,
    /// Histogram sum of every sample recorded.
    pub sum: u64,
}

/// How many samples a histogram keeps for inspection.
pub const HISTOGRAM_SAMPLES: usize = 10_000;

#[derive(Debug, Default)]
struct Inner {
    by_name: HashMap<String, u32>,
    metrics: Vec<Metric>,
}

#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `proxy_define_metric`: the id of the metric with this name, created if new.
    pub fn define(&self, kind: MetricType, name: &str) -> u32 {
        let mut inner = self.lock();
        if let Some(id) = inner.by_name.get(name) {
            return *id;
        }
        let id = u32::try_from(inner.metrics.len()).unwrap_or(u32::MAX);
        inner.metrics.push(Metric {
            name: name.to_string(),
            kind,
            value: 0,
            samples: Vec::new(),
            sum: 0,
        });
        inner.by_name.insert(name.to_string(), id);
        id
    }

    /// `proxy_increment_metric`: counters only go up; histograms cannot be incremented.
    pub fn increment(&self, id: u32, delta: i64) -> Result<(), Status> {
        let mut inner = self.lock();
        let m = inner.metrics.get_mut(id as usize).ok_or(Status::NotFound)?;
        match m.kind {
            MetricType::Counter if delta < 0 => Err(Status::BadArgument),
            MetricType::Counter | MetricType::Gauge => {
                m.value = m.value.saturating_add_signed(delta);
                Ok(())
            }
            MetricType::Histogram => Err(Status::BadArgument),
        }
    }

    /// `proxy_record_metric`: sets a counter or gauge; adds a histogram sample.
    pub fn record(&self, id: u32, value: u64) -> Result<(), Status> {
        let mut inner = self.lock();
        let m = inner.metrics.get_mut(id as usize).ok_or(Status::NotFound)?;
        match m.kind {
            MetricType::Counter | MetricType::Gauge => m.value = value,
            MetricType::Histogram => {
                m.value += 1;
                m.sum = m.sum.saturating_add(value);
                if m.samples.len() < HISTOGRAM_SAMPLES {
                    m.samples.push(value);
                }
            }
        }
        Ok(())
    }

    /// `proxy_get_metric`.
    pub fn get(&self, id: u32) -> Result<u64, Status> {
        let inner = self.lock();
        let m = inner.metrics.get(id as usize).ok_or(Status::NotFound)?;
        match m.kind {
            MetricType::Histogram => Err(Status::BadArgument),
            _ => Ok(m.value),
        }
    }

    /// The metric with this name.
    pub fn by_name(&self, name: &str) -> Option<Metric> {
        let inner = self.lock();
        let id = *inner.by_name.get(name)?;
        inner.metrics.get(id as usize).cloned()
    }

    /// Every metric, in definition order.
    pub fn all(&self) -> Vec<Metric> {
        self.lock().metrics.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_process_by_name() {
        let m = Metrics::default();
        let a = m.define(MetricType::Counter, "allowed");
        assert_eq!(m.define(MetricType::Counter, "allowed"), a);
        m.increment(a, 2).unwrap();
        assert_eq!(m.increment(a, -1), Err(Status::BadArgument));
        assert_eq!(m.get(a), Ok(2));
        let h = m.define(MetricType::Histogram, "time");
        m.record(h, 5).unwrap();
        m.record(h, 7).unwrap();
        let hist = m.by_name("time").unwrap();
        assert_eq!((hist.value, hist.sum, hist.samples.len()), (2, 12, 2));
        assert_eq!(m.get(99), Err(Status::NotFound));
    }
}
