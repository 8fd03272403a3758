//! A connection's bounded outbound queue: the router and the broadcast hub push pre-serialized
//! messages without waiting, the session's writer takes them in batches.
//!
//! Unlike a tokio mpsc channel (which allocates a block of slots up front), it holds no memory
//! once its session has been quiet for a moment ([`Queue::trim`]), and gives back what a burst
//! made it grow: idle connections are the common case and each one's footprint counts. A busy
//! session's queue keeps its buffer between batches: the producer (the hub, pushing one
//! broadcast to ten thousand queues on one thread) then never allocates. It is not a general
//! channel: one consumer, and a full queue is an error for the producer (the session is then
//! cut off), never a wait.
//!
//! "Full" counts frames, not entries, and not the entry the writer takes next: an entry (even
//! a transaction of 50,000 rows) is always accepted into an empty queue, and a push is refused
//! once more than `capacity` frames would wait behind the queue's first entry. So a client is
//! cut off for falling behind, not for being sent one large transaction, and what a session
//! holds is bounded by one entry plus `capacity` frames.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;

use super::Outbound;

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
    /// Frames in `items` (an entry may carry a transaction's worth).
    frames: usize,
    closed: bool,
}

impl Queue {
    pub fn new(capacity: usize) -> Queue {
        Queue { capacity: capacity.max(1), state: Mutex::new(State::default()), ready: Notify::new() }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Appends an entry unless the queue is full or closed.
    pub fn try_push(&self, item: Outbound) -> Result<(), PushError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.closed {
            return Err(PushError::Closed);
        }
        let frames = item.frames.len();
        if let Some(first) = state.items.front() {
            let behind_first = state.frames - first.frames.len();
            if behind_first + frames > self.capacity {
                return Err(PushError::Full);
            }
        }
        let was_empty = state.items.is_empty();
        state.frames += frames;
        state.items.push_back(item);
        drop(state);
        if was_empty {
            self.ready.notify_one();
        }
        Ok(())
    }

    /// Waits until something is queued, then moves entries of up to `limit_frames` frames
    /// (at least one entry) into `out`.
    pub async fn pop_many(&self, out: &mut Vec<Outbound>, limit_frames: usize) -> usize {
        loop {
            let n = self.take(out, limit_frames);
            if n > 0 {
                return n;
            }
            // A push between the check and here leaves a permit: no wake-up is lost.
            self.ready.notified().await;
        }
    }

    /// Moves queued entries into `out` without waiting, oldest first, while they add up to at
    /// most `limit_frames` frames (always at least one entry, however large); returns how many.
    pub fn take(&self, out: &mut Vec<Outbound>, limit_frames: usize) -> usize {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (mut entries, mut frames) = (0, 0);
        while let Some(next) = state.items.front() {
            let size = next.frames.len();
            if entries > 0 && frames + size > limit_frames {
                break;
            }
            let Some(entry) = state.items.pop_front() else { break };
            out.push(entry);
            entries += 1;
            frames += size;
        }
        if entries > 0 {
            state.frames -= frames;
        }
        entries
    }

    /// Gives back the buffer if nothing is queued (the session calls it once it has been quiet).
    pub fn trim(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.items.is_empty() {
            state.items = VecDeque::new();
        }
    }

    /// Refuses further pushes and drops what is queued.
    pub fn close(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.closed = true;
        state.items = VecDeque::new();
        state.frames = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::ws::Message;

    use crate::outbound::Frames;

    fn item(n: i64) -> Outbound {
        Outbound { frames: Frames::One(Message::Text(n.to_string().into())), commit_time_micros: n }
    }

    fn run(frames: usize, n: i64) -> Outbound {
        let messages: Vec<Message> = (0..frames).map(|i| Message::Text(i.to_string().into())).collect();
        Outbound { frames: Frames::Run(messages.into()), commit_time_micros: n }
    }

    #[tokio::test]
    async fn bounded_ordered_and_closable() {
        let queue = Queue::new(3);
        // Three wait behind the first.
        for n in 1..=4 {
            queue.try_push(item(n)).unwrap();
        }
        assert_eq!(queue.try_push(item(5)), Err(PushError::Full));
        let mut out = Vec::new();
        assert_eq!(queue.pop_many(&mut out, 2).await, 2);
        assert_eq!(queue.take(&mut out, 10), 2);
        assert_eq!(queue.take(&mut out, 10), 0);
        let order: Vec<i64> = out.iter().map(|o| o.commit_time_micros).collect();
        assert_eq!(order, [1, 2, 3, 4]);
        queue.close();
        assert_eq!(queue.try_push(item(6)), Err(PushError::Closed));
    }

    #[test]
    fn a_drained_queue_keeps_its_buffer_until_trimmed_and_a_trim_keeps_what_waits() {
        let queue = Queue::new(100);
        let capacity = |q: &Queue| q.state.lock().unwrap().items.capacity();
        for n in 0..40 {
            queue.try_push(item(n)).unwrap();
        }
        let mut out = Vec::new();
        assert_eq!(queue.take(&mut out, 64), 40);
        assert!(capacity(&queue) >= 40, "kept for the next batch: the producer does not allocate");
        queue.try_push(item(41)).unwrap();
        queue.trim();
        assert!(capacity(&queue) >= 1, "an entry waits: nothing given back");
        assert_eq!(queue.take(&mut out, 64), 1);
        queue.trim();
        assert_eq!(capacity(&queue), 0, "quiet and empty: nothing held");
    }

    #[test]
    fn a_transaction_larger_than_the_capacity_fits_an_empty_queue_but_nothing_large_waits_behind_it() {
        let queue = Queue::new(4);
        queue.try_push(run(100, 1)).unwrap();
        // Behind it: up to 4 frames.
        queue.try_push(run(3, 2)).unwrap();
        queue.try_push(item(3)).unwrap();
        assert_eq!(queue.try_push(item(4)), Err(PushError::Full));
        let mut out = Vec::new();
        assert_eq!(queue.take(&mut out, 1), 1);
        // The run of 3 is now first: 1 frame waits behind it, so 3 more fit, 4 do not.
        assert_eq!(queue.try_push(run(4, 4)), Err(PushError::Full));
        queue.try_push(run(3, 4)).unwrap();
        // Takes are bounded by frames: the 3-run and the single (4), not the next 3-run.
        assert_eq!(queue.take(&mut out, 5), 2);
        assert_eq!(queue.take(&mut out, 1), 1, "at least one entry, however large");
        let frames: Vec<usize> = out.iter().map(|o| o.frames.len()).collect();
        assert_eq!(frames, [100, 3, 1, 3]);
        // Empty again: any size is accepted.
        queue.try_push(run(1000, 5)).unwrap();
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
