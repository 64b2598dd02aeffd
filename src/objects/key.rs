//! Where an archived report's object lives: the deterministic key layout
//! (so a retried upload overwrites the same object), and the check that
//! keeps any key inside the store.

use crate::error::{Error, Result};
use chrono::{DateTime, Datelike, Utc};
use uuid::Uuid;

/// The prefix every archived report's key starts with.
pub const REPORTS_PREFIX: &str = "archived-reports/";

/// `archived-reports/YYYY/MM/<report id>.<format>` for a report created at
/// `created_at` (UTC). `format` is lowercased and kept to ASCII letters,
/// digits, `-` and `_` (an empty result becomes `bin`), so a stray value can
/// never add a path component.
pub fn report_key_base(created_at: DateTime<Utc>, id: Uuid, format: &str) -> String {
    let mut format: String = format
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if format.is_empty() {
        format = "bin".into();
    }
    format!(
        "{REPORTS_PREFIX}{:04}/{:02}/{}.{format}",
        created_at.year(),
        created_at.month(),
        id.as_hyphenated()
    )
}

/// Where a store check writes its test object and deletes it again:
/// `archived-reports/.archiver-check/<uuid>`, under the reports prefix (so
/// a lifecycle rule on it also expires one a crash left behind) and never
/// a report's key (those are `YYYY/MM/...`).
pub(super) fn check_key_name() -> String {
    format!("{REPORTS_PREFIX}.archiver-check/{}", Uuid::new_v4())
}

/// Refuses keys that are empty, absolute, or climb out of the store.
pub(super) fn check_key(key: &str) -> Result<()> {
    let bad = key.is_empty()
        || key.starts_with('/')
        || key.contains('\\')
        || key.contains('\0')
        || key
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..");
    if bad {
        return Err(Error::Refused(format!("invalid object key {key:?}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::store::Encoding;
    use chrono::TimeZone;

    #[test]
    fn report_keys_follow_the_layout() {
        let id = Uuid::parse_str("0b6a4c1e-8a1f-4d5e-9c2b-3f4e5d6c7b8a").unwrap();
        let at = Utc.with_ymd_and_hms(2025, 3, 31, 23, 59, 59).unwrap();
        assert_eq!(
            report_key_base(at, id, "csv"),
            "archived-reports/2025/03/0b6a4c1e-8a1f-4d5e-9c2b-3f4e5d6c7b8a.csv"
        );
        let at = Utc.with_ymd_and_hms(2024, 12, 1, 0, 0, 0).unwrap();
        assert_eq!(
            report_key_base(at, id, "../PDF"),
            "archived-reports/2024/12/0b6a4c1e-8a1f-4d5e-9c2b-3f4e5d6c7b8a.pdf"
        );
        assert!(report_key_base(at, id, "").ends_with(".bin"));
        let key = format!(
            "{}{}",
            report_key_base(at, id, "csv"),
            Encoding::Zstd.suffix()
        );
        assert!(key.ends_with(".csv.zst"));
        check_key(&key).unwrap();
    }

    #[test]
    fn bad_keys_are_refused() {
        for key in ["", "/abs", "a/../b", "a//b", "./a", "a\\b", "a/"] {
            assert!(matches!(check_key(key), Err(Error::Refused(_))), "{key:?}");
        }
    }
}
