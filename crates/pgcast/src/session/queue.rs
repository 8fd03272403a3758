//! A connection's bounded outbound queue: the router and the broadcast hub push pre-serialized
//! messages without waiting, the session's writer takes them in batches.
//!
//! Unlike a tokio mpsc channel (which allocates a block of slots up front), it holds no memory
//! while empty, and gives back what a burst made it grow: idle connections are the common case
//! and each one's footprint counts. It is not a general channel: one consumer, and a full queue
//! is an error for the producer (the session is then cut off), never a wait.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;

use super::Outbound;

/// Capacity kept after the queue drains; beyond it the buffer is released.
const KEEP: usize = 8;

/// Why a push was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum PushError {
    /// `capacity` messages are already waiting.
    Full,
    /// The session has ended.
    Closed,
}

#[derive(Debug)]
pub struct Queue {
    capacity: usize,
    state: Mutex<State>,
    ready: Notify,
}

#[derive(Debug, Default)]
struct State {
    items: VecDeque<Outbound>,
    closed: bool,
}

impl Queue {
    pub fn new(capacity: usize) -> Queue {
        Queue { capacity: capacity.max(1), state: Mutex::new(State::default()), ready: Notify::new() }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Appends a message unless the queue is full or closed.
    pub fn try_push(&self, item: Outbound) -> Result<(), PushError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.closed {
            return Err(PushError::Closed);
        }
        if state.items.len() >= self.capacity {
            return Err(PushError::Full);
        }
        let was_empty = state.items.is_empty();
        state.items.push_back(item);
        drop(state);
        if was_empty {
            self.ready.notify_one();
        }
        Ok(())
    }

    /// Waits until something is queued, then moves up to `limit` messages into `out`.
    pub async fn pop_many(&self, out: &mut Vec<Outbound>, limit: usize) -> usize {
        loop {
            let n = self.take(out, limit);
            if n > 0 {
                return n;
            }
            // A push between the check and here leaves a permit: no wake-up is lost.
            self.ready.notified().await;
        }
    }

    /// Moves up to `limit` queued messages into `out` without waiting.
    pub fn take(&self, out: &mut Vec<Outbound>, limit: usize) -> usize {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let n = state.items.len().min(limit);
        if n > 0 {
            out.extend(state.items.drain(..n));
            if state.items.is_empty() {
                state.items.shrink_to(KEEP);
            }
        }
        n
    }

    /// Refuses further pushes and drops what is queued.
    pub fn close(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.closed = true;
        state.items = VecDeque::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::ws::Message;

    fn item(n: i64) -> Outbound {
        Outbound { message: Message::Text(n.to_string().into()), commit_time_micros: n }
    }

    #[tokio::test]
    async fn bounded_ordered_and_closable() {
        let queue = Queue::new(3);
        for n in 1..=3 {
            queue.try_push(item(n)).unwrap();
        }
        assert_eq!(queue.try_push(item(4)), Err(PushError::Full));
        let mut out = Vec::new();
        assert_eq!(queue.pop_many(&mut out, 2).await, 2);
        assert_eq!(queue.take(&mut out, 10), 1);
        assert_eq!(queue.take(&mut out, 10), 0);
        let order: Vec<i64> = out.iter().map(|o| o.commit_time_micros).collect();
        assert_eq!(order, [1, 2, 3]);
        queue.close();
        assert_eq!(queue.try_push(item(5)), Err(PushError::Closed));
    }

    #[tokio::test]
    async fn a_waiting_consumer_wakes_on_push() {
        let queue = std::sync::Arc::new(Queue::new(8));
        let consumer = {
            let queue = queue.clone();
            tokio::spawn(async move {
                let mut out = Vec::new();
                queue.pop_many(&mut out, 8).await;
                out.len()
            })
        };
        tokio::task::yield_now().await;
        queue.try_push(item(1)).unwrap();
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), consumer).await;
        assert_eq!(got.expect("woken").expect("joined"), 1);
    }
}
