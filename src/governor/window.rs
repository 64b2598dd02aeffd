//! The maintenance window (`--window 01:00-06:00 [TZ]`) and the run's
//! deadline (`--max-runtime`).

use super::Governor;
use crate::error::Result;

/// A daily window of local time in which chunks may start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {}

impl std::str::FromStr for Window {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Window, String> {
        Err(format!("{s:?}: windows are not supported yet"))
    }
}

/// `Err(Error::HandBack)` outside the window or past the deadline.
pub fn check(_g: &Governor) -> Result<()> {
    Ok(())
}
