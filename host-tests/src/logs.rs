//! Log lines the filter wrote through `proxy_log` or to stdout/stderr.

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

/// Most lines kept; older ones are dropped first.
pub const MAX_LINES: usize = 200_000;

#[derive(Debug, Default)]
pub struct Logs {
    lines: Mutex<Vec<LogLine>>,
}

impl Logs {
    fn lock(&self) -> MutexGuard<'_, Vec<LogLine>> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn push(&self, line: LogLine) {
        let mut lines = self.lock();
        if lines.len() >= MAX_LINES {
            lines.drain(..MAX_LINES / 2);
        }
        if std::env::var_os("TENANTGATE_HOST_ECHO").is_some() {
            eprintln!("[vm {} {:?}] {}", line.vm, line.level, line.message);
        }
        lines.push(line);
    }

    pub fn all(&self) -> Vec<LogLine> {
        self.lock().clone()
    }

    pub fn clear(&self) {
        self.lock().clear();
    }
}
