//! Log lines the filter wrote through `proxy_log` or to stdout/stderr.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};

use crate::abi::LogLevel;

/// Where a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogSource {
    ProxyLog,
    Stdout,
    Stderr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// Index of the VM that wrote it.
    pub vm: usize,
    pub level: LogLevel,
    pub source: LogSource,
    pub message: String,
}

/// Lines kept by default; the oldest go first.
pub const DEFAULT_CAPACITY: usize = 100_000;

#[derive(Debug)]
pub struct Logs {
    lines: Mutex<VecDeque<LogLine>>,
    capacity: usize,
    echo: bool,
}

impl Default for Logs {
    fn default() -> Self {
        Logs::with_capacity(DEFAULT_CAPACITY)
    }
}

impl Logs {
    /// Keeps the last `capacity` lines. `TENANTGATE_HOST_ECHO=1` also prints
    /// every line to stderr.
    pub fn with_capacity(capacity: usize) -> Logs {
        Logs {
            lines: Mutex::new(VecDeque::new()),
            capacity,
            echo: std::env::var_os("TENANTGATE_HOST_ECHO").is_some(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<LogLine>> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn push(&self, line: LogLine) {
        if self.echo {
            eprintln!("[vm {} {:?}] {}", line.vm, line.level, line.message);
        }
        if self.capacity == 0 {
            return;
        }
        let mut lines = self.lock();
        while lines.len() >= self.capacity {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    pub fn all(&self) -> Vec<LogLine> {
        self.lock().iter().cloned().collect()
    }

    pub fn clear(&self) {
        self.lock().clear();
    }
}
