//! Per-tenant settings: the write path's flush thresholds, compaction, and GC/PITR retention.
//!
//! The pageserver's `pageserver.toml` gives the defaults; a tenant may override any of them at
//! creation (`POST /v1/tenant` with `config`, `neon_local tenant create -c key=value`) or later
//! (`PUT /v1/tenant/{tenant_id}/config`). Only the overrides are stored, in
//! `<workdir>/tenants/<tenant>/config.json`, so a changed pageserver default reaches every tenant
//! that did not pin the value.

use std::collections::BTreeMap;
use std::time::Duration;

/// Default `checkpoint_distance`: flush the open layer once it holds this much.
pub const DEFAULT_CHECKPOINT_DISTANCE_BYTES: u64 = 256 * 1024 * 1024;
/// Default `checkpoint_timeout`: flush the open layer once it is this old.
pub const DEFAULT_CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// Default `compaction_period`: how often the background loop looks for compaction work.
pub const DEFAULT_COMPACTION_PERIOD: Duration = Duration::from_secs(20);
/// Default `compaction_threshold`: compact once this many L0 deltas have accumulated.
pub const DEFAULT_COMPACTION_THRESHOLD: usize = 10;
/// Default `compaction_target_size`: the size of the L1 deltas compaction writes.
pub const DEFAULT_COMPACTION_TARGET_SIZE_BYTES: u64 = 128 * 1024 * 1024;
/// Default `image_creation_threshold`: write an image layer for a key range once this many
/// delta layers lie above its newest image.
pub const DEFAULT_IMAGE_CREATION_THRESHOLD: usize = 3;
/// Default `gc_period`: how often the background loop collects garbage.
pub const DEFAULT_GC_PERIOD: Duration = Duration::from_secs(60 * 60);
/// Default `gc_horizon`: WAL bytes of history always kept below the last record.
pub const DEFAULT_GC_HORIZON_BYTES: u64 = 64 * 1024 * 1024;
/// Default `pitr_interval`: time of history kept for point-in-time reads and branches.
pub const DEFAULT_PITR_INTERVAL: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// Default `lsn_lease_length`: how long a lease on an LSN (a compute's read point) lasts
/// without renewal; also how long GC waits after a start.
pub const DEFAULT_LSN_LEASE_LENGTH: Duration = Duration::from_secs(10 * 60);

/// Name of the overrides file in the tenant directory.
pub const TENANT_CONFIG_FILE_NAME: &str = "config.json";

/// Per-tenant settings (see the module docs). A zero period disables that background loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantConf {
    /// Freeze and flush the open in-memory layer once it holds this many bytes. Bounds the
    /// memory and the WAL to re-ingest after a crash.
    pub checkpoint_distance_bytes: u64,
    /// Freeze and flush the open layer once it is this old, so a quiet timeline becomes durable.
    pub checkpoint_timeout: Duration,
    pub compaction_period: Duration,
    pub compaction_threshold: usize,
    pub compaction_target_size_bytes: u64,
    pub image_creation_threshold: usize,
    pub gc_period: Duration,
    pub gc_horizon_bytes: u64,
    pub pitr_interval: Duration,
    pub lsn_lease_length: Duration,
}

impl Default for TenantConf {
    fn default() -> Self {
        TenantConf {
            checkpoint_distance_bytes: DEFAULT_CHECKPOINT_DISTANCE_BYTES,
            checkpoint_timeout: DEFAULT_CHECKPOINT_TIMEOUT,
            compaction_period: DEFAULT_COMPACTION_PERIOD,
            compaction_threshold: DEFAULT_COMPACTION_THRESHOLD,
            compaction_target_size_bytes: DEFAULT_COMPACTION_TARGET_SIZE_BYTES,
            image_creation_threshold: DEFAULT_IMAGE_CREATION_THRESHOLD,
            gc_period: DEFAULT_GC_PERIOD,
            gc_horizon_bytes: DEFAULT_GC_HORIZON_BYTES,
            pitr_interval: DEFAULT_PITR_INTERVAL,
            lsn_lease_length: DEFAULT_LSN_LEASE_LENGTH,
        }
    }
}

/// The setting names, as users write them (`-c pitr_interval=1h`).
pub const TENANT_CONF_KEYS: &[&str] = &[
    "checkpoint_distance",
    "checkpoint_timeout",
    "compaction_period",
    "compaction_threshold",
    "compaction_target_size",
    "image_creation_threshold",
    "gc_period",
    "gc_horizon",
    "pitr_interval",
    "lsn_lease_length",
];

impl TenantConf {
    /// Sets one setting from its user-facing form: sizes in bytes, durations like `10s`, `5m`,
    /// `7d`. The error names the key and what a valid value looks like.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        let bytes = |v: &str| -> Result<u64, String> {
            v.trim().parse::<u64>().map_err(|_| format!("{key}: '{v}' is not a size in bytes (e.g. 268435456)"))
        };
        let count = |v: &str, min: usize| -> Result<usize, String> {
            match v.trim().parse::<usize>() {
                Ok(n) if n >= min => Ok(n),
                _ => Err(format!("{key}: '{v}' is not a whole number of at least {min}")),
            }
        };
        let duration = |v: &str| crate::config::parse_duration(v).map_err(|e| format!("{key}: {e}"));
        match key {
            "checkpoint_distance" => {
                let v = bytes(value)?;
                if v == 0 {
                    return Err(format!("{key}: must be above 0 bytes"));
                }
                self.checkpoint_distance_bytes = v;
            }
            "checkpoint_timeout" => self.checkpoint_timeout = duration(value)?,
            "compaction_period" => self.compaction_period = duration(value)?,
            "compaction_threshold" => self.compaction_threshold = count(value, 2)?,
            "compaction_target_size" => {
                let v = bytes(value)?;
                if v < 8192 {
                    return Err(format!("{key}: '{value}' is below one page (8192 bytes)"));
                }
                self.compaction_target_size_bytes = v;
            }
            "image_creation_threshold" => self.image_creation_threshold = count(value, 1)?,
            "gc_period" => self.gc_period = duration(value)?,
            "gc_horizon" => self.gc_horizon_bytes = bytes(value)?,
            "pitr_interval" => self.pitr_interval = duration(value)?,
            "lsn_lease_length" => self.lsn_lease_length = duration(value)?,
            other => {
                return Err(format!(
                    "unknown tenant setting '{other}'; the settings are: {}",
                    TENANT_CONF_KEYS.join(", ")
                ))
            }
        }
        Ok(())
    }

    /// `self` with every override applied, or the first bad one's error.
    pub fn with_overrides(&self, overrides: &BTreeMap<String, String>) -> Result<TenantConf, String> {
        let mut conf = self.clone();
        for (k, v) in overrides {
            conf.set(k, v)?;
        }
        Ok(conf)
    }

    /// Every setting in its user-facing form (the effective configuration the API shows).
    pub fn to_map(&self) -> BTreeMap<String, String> {
        let d = |d: Duration| {
            if d.subsec_millis() != 0 {
                format!("{}ms", d.as_millis())
            } else {
                format!("{}s", d.as_secs())
            }
        };
        BTreeMap::from([
            ("checkpoint_distance".to_string(), self.checkpoint_distance_bytes.to_string()),
            ("checkpoint_timeout".to_string(), d(self.checkpoint_timeout)),
            ("compaction_period".to_string(), d(self.compaction_period)),
            ("compaction_threshold".to_string(), self.compaction_threshold.to_string()),
            ("compaction_target_size".to_string(), self.compaction_target_size_bytes.to_string()),
            ("image_creation_threshold".to_string(), self.image_creation_threshold.to_string()),
            ("gc_period".to_string(), d(self.gc_period)),
            ("gc_horizon".to_string(), self.gc_horizon_bytes.to_string()),
            ("pitr_interval".to_string(), d(self.pitr_interval)),
            ("lsn_lease_length".to_string(), d(self.lsn_lease_length)),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_round_trips_and_bad_values_are_named() {
        let mut c = TenantConf::default();
        let map = c.to_map();
        assert_eq!(map.len(), TENANT_CONF_KEYS.len());
        for k in TENANT_CONF_KEYS {
            assert!(map.contains_key(*k), "{k} missing from to_map");
        }
        assert_eq!(TenantConf::default().with_overrides(&map).unwrap(), c);
        c.set("pitr_interval", "1h").unwrap();
        assert_eq!(c.pitr_interval, Duration::from_secs(3600));
        c.set("gc_horizon", "0").unwrap();
        assert_eq!(c.gc_horizon_bytes, 0);
        let err = c.set("pitr_intervall", "1h").unwrap_err();
        assert!(err.contains("unknown tenant setting 'pitr_intervall'") && err.contains("pitr_interval"), "{err}");
        let err = c.set("compaction_threshold", "1").unwrap_err();
        assert!(err.starts_with("compaction_threshold:"), "{err}");
        assert!(c.set("checkpoint_timeout", "soon").unwrap_err().starts_with("checkpoint_timeout:"));
        assert!(c.set("checkpoint_distance", "0").is_err());
    }
}
