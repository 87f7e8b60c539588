//! How much memory a model needs and how much the machine has, compared before anything is
//! allocated: a config within [`RobertaConfig::validate`]'s limits can still be beyond the
//! machine (vocab_size 16M x hidden 1024 is 64 GB of f32), and the allocator's answer to that
//! is an abort, not an error.
//!
//! [`RobertaConfig::validate`]: crate::RobertaConfig::validate

use crate::ConfigError;

/// Environment variable that replaces the machine's available memory (in bytes) in these
/// checks: for tests, and for a machine where other processes will need their share.
pub const MEMORY_LIMIT_ENV: &str = "MASKLM_MEMORY_LIMIT";

/// Bytes that new allocations may take: `MASKLM_MEMORY_LIMIT` when set, else `MemAvailable`
/// from `/proc/meminfo`; `None` where neither is known (no check is then made).
pub fn available_memory() -> Result<Option<u64>, ConfigError> {
    if let Ok(text) = std::env::var(MEMORY_LIMIT_ENV) {
        return text
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| ConfigError::Invalid {
                key: MEMORY_LIMIT_ENV,
                reason: format!("{text:?} is not a whole number of bytes (e.g. 8000000000)"),
                path: None,
            });
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    Ok(mem_available(&meminfo))
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

/// Refuses to allocate `needed` bytes for `what` when the machine has less available;
/// `advice` says what to change.
pub fn check_memory(needed: u64, what: &str, advice: &str) -> Result<(), ConfigError> {
    fits(needed, available_memory()?, what, advice)
}

fn fits(needed: u64, available: Option<u64>, what: &str, advice: &str) -> Result<(), ConfigError> {
    match available {
        Some(available) if needed > available => Err(ConfigError::Memory {
            what: what.to_string(),
            needed,
            available,
            advice: advice.to_string(),
        }),
        _ => Ok(()),
    }
}

/// `bytes` for a person: "64.0 GB", "12.5 MB", "100 kB".
pub fn human_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.1} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.0} kB", (b / 1e3).ceil())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_available_is_read_in_bytes() {
        let text =
            "MemTotal:       24684084 kB\nMemFree:  15670624 kB\nMemAvailable:   23221288 kB\n";
        assert_eq!(mem_available(text), Some(23221288 * 1024));
        assert_eq!(mem_available("MemTotal: 1 kB\n"), None);
        assert_eq!(mem_available("MemAvailable: lots kB\n"), None);
    }

    #[test]
    fn more_than_available_is_refused_with_both_figures_and_the_advice() {
        assert!(fits(100, Some(100), "x", "y").is_ok());
        assert!(
            fits(u64::MAX, None, "x", "y").is_ok(),
            "unknown memory: no check"
        );
        let msg = fits(
            64_000_000_000,
            Some(23_000_000_000),
            "a model",
            "lower vocab_size",
        )
        .unwrap_err()
        .to_string();
        for part in [
            "a model",
            "64.0 GB",
            "23.0 GB",
            MEMORY_LIMIT_ENV,
            "lower vocab_size",
        ] {
            assert!(msg.contains(part), "{part:?} not in {msg}");
        }
    }
}
