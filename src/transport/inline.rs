//! No broker: an in-process queue. The planner publishes into it and runs the
//! same worker loop over it, so one machine needs nothing but PostgreSQL.
//! `receive` returns `None` once the publisher is closed and every message
//! is settled.

use super::{Acknowledge, BatchMessage, Consumer, Delivery, Publisher};
use crate::error::{Error, Result};
use async_trait::async_trait;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use tokio::sync::{Mutex, Notify, mpsc};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Default)]
struct Shared {
    /// Published and not yet acked or dead-lettered.
    unsettled: AtomicUsize,
    closed: AtomicBool,
    changed: Notify,
    /// Payloads dead-lettered, with reasons (the in-process DLQ).
    dead: Mutex<Vec<(Vec<u8>, String)>>,
    /// Cancelled by a hand-back: the run stops (see `InlineAcker::hand_back`).
    halt: CancellationToken,
}

impl Shared {
    fn settle(&self) {
        self.unsettled.fetch_sub(1, Ordering::SeqCst);
        self.changed.notify_waiters();
    }
}

/// Creates a connected publisher/consumer pair.
pub fn queue(halt: CancellationToken) -> (InlinePublisher, InlineConsumer) {
    let (tx, rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        halt,
        ..Shared::default()
    });
    (
        InlinePublisher {
            tx: tx.clone(),
            shared: shared.clone(),
        },
        InlineConsumer { rx, tx, shared },
    )
}

/// The planner's side.
#[derive(Debug)]
pub struct InlinePublisher {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    shared: Arc<Shared>,
}

impl InlinePublisher {
    /// Messages dead-lettered so far, with reasons.
    pub async fn dead_letters(&self) -> Vec<(Vec<u8>, String)> {
        self.shared.dead.lock().await.clone()
    }
}

#[async_trait]
impl Publisher for InlinePublisher {
    async fn publish(&self, messages: &[BatchMessage]) -> Result<()> {
        // The run has stopped (a hand-back, the window, the deadline): what
        // is planned from now on is recorded in the ledger (pending, for the
        // next run) but not queued.
        if self.shared.halt.is_cancelled() {
            return Ok(());
        }
        for m in messages {
            self.shared.unsettled.fetch_add(1, Ordering::SeqCst);
            if self.tx.send(m.encode()).is_err() {
                self.shared.settle();
                // Stopped meanwhile: the batches stay pending, as above.
                if self.shared.halt.is_cancelled() {
                    return Ok(());
                }
                return Err(Error::Broker("inline queue: executors have stopped".into()));
            }
        }
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        self.shared.closed.store(true, Ordering::SeqCst);
        self.shared.changed.notify_waiters();
        Ok(())
    }
}

/// The executors' side.
#[derive(Debug)]
pub struct InlineConsumer {
    rx: mpsc::UnboundedReceiver<Vec<u8>>,
    tx: mpsc::UnboundedSender<Vec<u8>>,
    shared: Arc<Shared>,
}

#[async_trait]
impl Consumer for InlineConsumer {
    async fn receive(&mut self) -> Result<Option<Delivery>> {
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Ok(payload) = self.rx.try_recv() {
                return Ok(Some(self.delivery(payload)));
            }
            if self.shared.closed.load(Ordering::SeqCst)
                && self.shared.unsettled.load(Ordering::SeqCst) == 0
            {
                return Ok(None);
            }
            tokio::select! {
                p = self.rx.recv() => match p {
                    Some(payload) => return Ok(Some(self.delivery(payload))),
                    None => return Ok(None),
                },
                _ = changed => {}
            }
        }
    }

    async fn stop(&mut self) {
        self.rx.close();
    }
}

impl InlineConsumer {
    fn delivery(&self, payload: Vec<u8>) -> Delivery {
        Delivery {
            payload: payload.clone(),
            redelivered: false,
            acker: Box::new(InlineAcker {
                payload,
                tx: self.tx.clone(),
                shared: self.shared.clone(),
            }),
        }
    }
}

struct InlineAcker {
    payload: Vec<u8>,
    tx: mpsc::UnboundedSender<Vec<u8>>,
    shared: Arc<Shared>,
}

#[async_trait]
impl Acknowledge for InlineAcker {
    async fn ack(self: Box<Self>) -> Result<()> {
        self.shared.settle();
        Ok(())
    }

    async fn dead_letter(self: Box<Self>, reason: &str) -> Result<()> {
        self.shared
            .dead
            .lock()
            .await
            .push((self.payload.clone(), reason.to_string()));
        self.shared.settle();
        Ok(())
    }

    async fn retry_later(self: Box<Self>) -> Result<()> {
        // The worker counts attempts in the ledger and dead-letters past the
        // limit, so requeueing here cannot loop for ever.
        let _ = self.tx.send(self.payload);
        Ok(())
    }

    /// With no broker there is no other worker to take it, and running it
    /// again at once would meet what stopped it (the window, the deadline,
    /// replicas lagging for `--max-lag-wait`) again, in a loop: the run
    /// stops instead, and the batch stays pending in the ledger (its cursor
    /// keeping what was done) for the next run.
    async fn hand_back(self: Box<Self>) -> Result<()> {
        self.shared.halt.cancel();
        self.shared.settle();
        Ok(())
    }
}
