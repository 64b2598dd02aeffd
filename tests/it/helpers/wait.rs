//! Waiting for a condition instead of sleeping: one bounded poll loop that
//! every test uses, so a slow machine waits longer and a fast one does not.

use std::future::Future;
use std::time::{Duration, Instant};

/// How often a condition is looked at again.
const POLL: Duration = Duration::from_millis(50);

/// What a condition returns: `bool` (met or not), or `Option<T>` (met with
/// a value, or not yet).
pub trait Condition {
    type Value;
    fn met(self) -> Option<Self::Value>;
}

impl Condition for bool {
    type Value = ();
    fn met(self) -> Option<()> {
        self.then_some(())
    }
}

impl<T> Condition for Option<T> {
    type Value = T;
    fn met(self) -> Option<T> {
        self
    }
}

/// Polls `condition` until it is met and returns its value; `None` if it
/// is not met within `timeout` (for a test that measures rather than
/// requires).
pub async fn poll_until<C, F, Fut>(timeout: Duration, mut condition: F) -> Option<C::Value>
where
    C: Condition,
    F: FnMut() -> Fut,
    Fut: Future<Output = C>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = condition().await.met() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Polls `condition` until it is met and returns its value; panics naming
/// `what` if it is not met within `timeout`.
pub async fn wait_until<C, F, Fut>(what: &str, timeout: Duration, condition: F) -> C::Value
where
    C: Condition,
    F: FnMut() -> Fut,
    Fut: Future<Output = C>,
{
    poll_until(timeout, condition)
        .await
        .unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"))
}
