//! Positions and the history of recent changes, for resuming clients.
//!
//! A [`Position`] is the commit LSN of a change's transaction and the change's index in it:
//! totally ordered, and stable across restarts because it comes from the WAL. The [`History`]
//! keeps the changes of the retention window (a count and an age) in commit order. It survives a
//! server restart without storage of its own: pgcast holds the slot's confirmed position at the
//! oldest retained transaction ([`Progress::hold`]), so a restarted server re-reads the window
//! from the slot and rebuilds the same history. The WAL PostgreSQL keeps for pgcast is therefore
//! bounded by the retention setting, clients or not.
//!
//! The history knows nothing of subscribers; replaying it for one is the session's job.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::capture::{Lsn, Progress, Transaction};

/// Where a change stands in the stream: (commit LSN, index within the transaction).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub lsn: Lsn,
    pub index: u32,
}

impl fmt::Display for Position {
    /// Fixed-width hex, so positions also sort as strings: `0000000001A2B3C4.00000003`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016X}.{:08X}", self.lsn, self.index)
    }
}

impl std::str::FromStr for Position {
    type Err = String;
    fn from_str(s: &str) -> Result<Position, String> {
        let invalid = || format!("invalid position {s:?}: expected 16 hex digits, '.', 8 hex digits");
        let (lsn, index) = s.split_once('.').ok_or_else(invalid)?;
        if lsn.len() != 16 || index.len() != 8 {
            return Err(invalid());
        }
        Ok(Position {
            lsn: u64::from_str_radix(lsn, 16).map_err(|_| invalid())?,
            index: u32::from_str_radix(index, 16).map_err(|_| invalid())?,
        })
    }
}

/// How long and how much history to keep.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub max_changes: usize,
    pub max_age: Duration,
}

/// Why a resume cannot be served from history.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResyncReason {
    #[error("epoch {given:?} is not the current epoch {current:?}: history was reset")]
    Epoch { given: String, current: String },
    #[error("position {given} is older than the history held (changes up to {lost} are gone)")]
    TooOld { given: Position, lost: Position },
}

/// The retained transactions, oldest first.
pub struct History {
    epoch: String,
    retention: Retention,
    transactions: VecDeque<Arc<Transaction>>,
    changes: usize,
    /// Resuming from a position before this one cannot be served: something after it is gone.
    lost_through: Position,
    /// Commit LSN of the newest transaction appended: anything at or before it is a repeat.
    newest: Lsn,
}

impl History {
    /// An empty history whose changes before `start` (the history slot's position, or the first
    /// retained outbox transaction, when this server started) are not available.
    pub fn new(epoch: String, retention: Retention, start: Lsn) -> History {
        History {
            epoch,
            retention,
            transactions: VecDeque::new(),
            changes: 0,
            // Everything strictly before `start` is gone; a change at `start` or later is not.
            lost_through: Position { lsn: start.saturating_sub(1), index: u32::MAX },
            newest: 0,
        }
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    pub fn len(&self) -> usize {
        self.changes
    }

    pub fn is_empty(&self) -> bool {
        self.changes == 0
    }

    /// Appends a transaction, prunes past retention, and tells `progress` how far the history
    /// slot may be advanced. Returns `false`, appending nothing, for a transaction at or before
    /// the newest one (streamed again after a reconnect).
    pub fn append(&mut self, tx: Arc<Transaction>, now_micros: i64, progress: &Progress) -> bool {
        if tx.commit_lsn <= self.newest && !tx.changes.is_empty() {
            return false;
        }
        self.newest = self.newest.max(tx.commit_lsn);
        if !tx.changes.is_empty() {
            self.changes += tx.changes.len();
            self.transactions.push_back(tx);
        }
        self.prune(now_micros, progress);
        true
    }

    /// Drops transactions past the count or age limit (whole transactions, oldest first).
    pub fn prune(&mut self, now_micros: i64, progress: &Progress) {
        let max_age_micros = self.retention.max_age.as_micros() as i64;
        while let Some(oldest) = self.transactions.front() {
            let too_many = self.changes > self.retention.max_changes;
            let too_old = now_micros - oldest.commit_time_micros > max_age_micros;
            if !too_many && !too_old {
                break;
            }
            tracing::debug!(
                commit = %crate::capture::format_lsn(oldest.commit_lsn),
                too_many,
                too_old,
                retained = self.changes,
                "history pruned"
            );
            let last = oldest.changes.len().saturating_sub(1) as u32;
            self.lost_through = Position { lsn: oldest.commit_lsn, index: last };
            self.changes -= oldest.changes.len();
            self.transactions.pop_front();
        }
        // Hold the slot at the oldest retained transaction so a restart re-reads the window.
        progress.hold(self.transactions.front().map(|tx| tx.commit_lsn));
    }

    /// The position of the newest retained change (or, with none retained, the newest one that
    /// is gone): a subscription made now has everything after it.
    pub fn head(&self) -> Position {
        match self.transactions.back() {
            Some(tx) => Position { lsn: tx.commit_lsn, index: tx.changes.len().saturating_sub(1) as u32 },
            None => self.lost_through,
        }
    }

    /// Every retained change after `position`, in order, or why that cannot be served.
    pub fn since(
        &self,
        epoch: &str,
        position: Position,
    ) -> Result<Vec<(Position, Arc<Transaction>, usize)>, ResyncReason> {
        if epoch != self.epoch {
            return Err(ResyncReason::Epoch { given: epoch.to_string(), current: self.epoch.clone() });
        }
        if position < self.lost_through {
            return Err(ResyncReason::TooOld { given: position, lost: self.lost_through });
        }
        let mut out = Vec::new();
        for tx in &self.transactions {
            if tx.commit_lsn < position.lsn {
                continue;
            }
            for index in 0..tx.changes.len() {
                let at = Position { lsn: tx.commit_lsn, index: index as u32 };
                if at > position {
                    out.push((at, tx.clone(), index));
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tx(commit_lsn: Lsn, changes: usize, commit_time_micros: i64) -> Arc<Transaction> {
        use crate::capture::{Change, ChangeKind, Relation, Row};
        let relation = Arc::new(Relation {
            oid: 1,
            schema: "public".into(),
            name: "t".into(),
            replica_identity: b'd',
            columns: vec![],
        });
        let change =
            Change { relation, kind: ChangeKind::Insert, new: Some(Row { values: vec![] }), old: None };
        Arc::new(Transaction {
            commit_lsn,
            end_lsn: commit_lsn + 8,
            commit_time_micros,
            changes: vec![change; changes],
        })
    }

    fn history(max_changes: usize) -> History {
        History::new("e1".into(), Retention { max_changes, max_age: Duration::from_secs(60) }, 50)
    }

    #[test]
    fn positions_order_and_round_trip_as_strings() {
        let a = Position { lsn: 0x1A2B, index: 3 };
        let b = Position { lsn: 0x1A2B, index: 10 };
        let c = Position { lsn: 0x1A2C, index: 0 };
        assert!(a < b && b < c);
        assert!(a.to_string() < b.to_string() && b.to_string() < c.to_string());
        assert_eq!(a.to_string().parse::<Position>().unwrap(), a);
        assert!("12.3".parse::<Position>().is_err());
    }

    #[test]
    fn since_returns_what_follows_a_position_and_refuses_what_was_pruned() {
        let progress = Progress::default();
        let mut h = history(4);
        h.append(tx(100, 2, 0), 0, &progress);
        h.append(tx(200, 2, 0), 0, &progress);
        let after: Vec<Position> =
            h.since("e1", Position { lsn: 100, index: 0 }).unwrap().iter().map(|e| e.0).collect();
        assert_eq!(
            after,
            [
                Position { lsn: 100, index: 1 },
                Position { lsn: 200, index: 0 },
                Position { lsn: 200, index: 1 }
            ]
        );
        assert_eq!(progress.confirmable_with(u64::MAX), 100, "slot held at the oldest retained commit");

        h.append(tx(300, 1, 0), 0, &progress); // 5 changes > 4: the transaction at 100 goes
        assert!(matches!(h.since("e1", Position { lsn: 100, index: 0 }), Err(ResyncReason::TooOld { .. })));
        assert_eq!(
            h.since("e1", Position { lsn: 100, index: 1 }).unwrap().len(),
            3,
            "nothing missed after 100.1"
        );
        assert_eq!(progress.confirmable_with(u64::MAX), 200);
        assert!(matches!(h.since("e0", Position { lsn: 300, index: 0 }), Err(ResyncReason::Epoch { .. })));
        assert!(
            matches!(h.since("e1", Position { lsn: 10, index: 0 }), Err(ResyncReason::TooOld { .. })),
            "before start"
        );
    }

    #[test]
    fn old_transactions_age_out_and_release_the_slot() {
        let progress = Progress::default();
        let mut h =
            History::new("e".into(), Retention { max_changes: 100, max_age: Duration::from_secs(1) }, 0);
        h.append(tx(100, 1, 0), 0, &progress);
        assert_eq!(progress.confirmable_with(500), 100);
        h.prune(2_000_000, &progress);
        assert!(h.is_empty());
        assert_eq!(progress.confirmable_with(500), 500, "nothing retained: no hold");
    }
}
