//! What config validation found: problems with the dotted key path they are at. A leaf module,
//! so every component's `Config → Settings` validation can report into one list without
//! depending on the module that composes them ([`crate::config`]).

use std::time::Duration;

/// One problem found in a config: where (dotted key path) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, e.g. `exporters.mlflow.every_steps`; empty for the whole config.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

/// Problems collected during validation, in the order they were found.
#[derive(Debug, Default)]
pub struct Problems(Vec<Problem>);

impl Problems {
    /// Records a problem at `path`.
    pub fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }
    /// How many problems were recorded.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// Whether none was recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// The problems, in the order found.
    pub fn into_vec(self) -> Vec<Problem> {
        self.0
    }
    /// Records a duration that must be positive and at most [`MAX_DURATION`], at `path.key`
    /// (`key` alone when `path` is empty). `None` (unset) is fine.
    pub fn positive(&mut self, path: &str, key: &str, d: Option<Duration>) {
        let at = if path.is_empty() {
            key.to_string()
        } else {
            format!("{path}.{key}")
        };
        match d {
            Some(d) if d.is_zero() => self.add(at, "must be positive"),
            Some(d) if d > MAX_DURATION => self.add(at, "must be at most 24h"),
            _ => {}
        }
    }
}

/// Longest duration any setting may take (1 day): beyond it instants overflow, and no cadence,
/// timeout or retry of a training run needs more.
pub const MAX_DURATION: Duration = Duration::from_secs(86_400);
