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

use std::sync::Arc;

use tokio::sync::Notify;

use super::feed::Membership;
use super::Outbound;

/// What the queue holds: a message, or a marker for a topic feed's entries (expanded when
/// taken: see `feed`).
#[derive(Debug)]
enum Item {
    Out(Outbound),
    Feed(Mark),
}

/// A feed marker, and where its entries stop: a message queued behind the marker seals it at
/// the feed's end then, so entries appended later go after that message, as they were sent.
#[derive(Debug)]
struct Mark {
    membership: Arc<Membership>,
    seal: Option<u64>,
}

impl Item {
    /// Frames it counts for: a marker counts one (its feed is bounded on its own).
    fn frames(&self) -> usize {
        match self {
            Item::Out(out) => out.frames.len(),
            Item::Feed(_) => 1,
        }
    }
}

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
    items: VecDeque<Item>,
    /// Markers in `items` not sealed yet.
    unsealed: usize,
    /// Frames in `items` (an entry may carry a transaction's worth).
    frames: usize,
    closed: bool,
}

impl State {
    /// Seals every unsealed marker at its feed's end now (a message is being queued behind them).
    fn seal_marks(&mut self) {
        for item in self.items.iter_mut() {
            if let Item::Feed(mark) = item {
                if mark.seal.is_none() {
                    mark.seal = Some(mark.membership.feed_end());
                }
            }
        }
        self.unsealed = 0;
    }
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
        self.push(Item::Out(item))
    }

    /// Queues a marker: when taken, it is replaced by the feed's entries this member has not
    /// been handed yet.
    pub fn notify_feed(&self, membership: Arc<Membership>) -> Result<(), PushError> {
        self.push(Item::Feed(Mark { membership, seal: None }))
    }

    fn push(&self, item: Item) -> Result<(), PushError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.closed {
            return Err(PushError::Closed);
        }
        let frames = item.frames();
        if let Some(first) = state.items.front() {
            let behind_first = state.frames - first.frames();
            if behind_first + frames > self.capacity {
                return Err(PushError::Full);
            }
        }
        let was_empty = state.items.is_empty();
        match &item {
            Item::Feed(_) => state.unsealed += 1,
            Item::Out(_) if state.unsealed > 0 => state.seal_marks(),
            Item::Out(_) => {}
        }
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
    /// most `limit_frames` frames (always at least one entry, however large; a feed marker
    /// counts one and brings every entry it stands for); returns how many messages `out` got.
    pub fn take(&self, out: &mut Vec<Outbound>, limit_frames: usize) -> usize {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let before = out.len();
        let (mut entries, mut frames) = (0, 0);
        while let Some(next) = state.items.front() {
            let size = next.frames();
            if entries > 0 && frames + size > limit_frames {
                break;
            }
            let Some(item) = state.items.pop_front() else { break };
            match item {
                Item::Out(entry) => out.push(entry),
                // Under the queue's lock (the feed's is taken inside it, never the other way):
                // a marker is expanded in its place, so the order of what is queued holds.
                Item::Feed(Mark { membership, seal }) => {
                    if seal.is_none() {
                        state.unsealed -= 1;
                    }
                    // Sealed short of the feed's end: what came after goes behind the messages
                    // that sealed it, with a new marker (unless one was queued meanwhile).
                    if membership.expand(out, seal) && membership.flag() {
                        state.unsealed += 1;
                        state.frames += 1;
                        state.items.push_back(Item::Feed(Mark { membership, seal: None }));
                    }
                }
            }
            entries += 1;
            frames += size;
        }
        if entries > 0 {
            state.frames -= frames;
        }
        out.len() - before
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
        state.unsealed = 0;
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
