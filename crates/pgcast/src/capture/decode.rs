//! pgoutput (protocol version 1) messages -> [`Transaction`]s.
//!
//! A [`Decoder`] keeps the Relation messages it has seen and the transaction being assembled; it
//! returns a whole transaction at its Commit. Any malformed message is a [`DecodeError`], never a
//! panic: the bytes come from the network.
//!
//! This is not a replication client: it does not read from a socket or track LSNs it is not told.

use std::collections::HashMap;
use std::sync::Arc;

use super::catalog::TypeCatalog;
use super::{Change, ChangeKind, Column, Lsn, Relation, Row, Transaction, Value};

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("pgoutput message truncated while reading {0}")]
    Truncated(&'static str),
    #[error("unknown pgoutput message type {0:?}")]
    UnknownMessage(char),
    #[error("unknown tuple value kind {0:?}")]
    UnknownTupleKind(char),
    #[error("change for relation {0} before its Relation message")]
    UnknownRelation(u32),
    #[error("column type {0} is not in the type catalog yet")]
    UnknownType(u32),
    #[error("tuple has {got} columns but relation {relation} has {expected}")]
    ColumnCount { relation: u32, got: usize, expected: usize },
    #[error("{0} outside a transaction")]
    OutsideTransaction(&'static str),
    #[error("binary tuple values are not supported (column {0})")]
    BinaryValue(usize),
    #[error("text value is not valid UTF-8")]
    InvalidUtf8,
}

/// What one message amounted to.
#[derive(Debug)]
pub enum Decoded {
    /// A complete transaction (at its Commit message).
    Transaction(Transaction),
    /// The message was absorbed (Begin, Relation, a change within a transaction, ...).
    Nothing,
}

#[derive(Default)]
pub struct Decoder {
    relations: HashMap<u32, Arc<Relation>>,
    open: Option<OpenTransaction>,
}

struct OpenTransaction {
    changes: Vec<Change>,
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Decodes one pgoutput message. On [`DecodeError::UnknownType`] nothing was changed: refresh
    /// the catalog and call again with the same bytes.
    pub fn decode(&mut self, msg: &[u8], types: &TypeCatalog) -> Result<Decoded, DecodeError> {
        let mut r = Reader { buf: msg, pos: 0 };
        let tag = r.u8("message type")?;
        match tag {
            b'B' => {
                let _final_lsn = r.u64("begin lsn")?;
                let _commit_ts = r.i64("begin timestamp")?;
                let _xid = r.u32("xid")?;
                self.begin();
                Ok(Decoded::Nothing)
            }
            b'C' => {
                let _flags = r.u8("commit flags")?;
                let commit_lsn = r.u64("commit lsn")?;
                let end_lsn = r.u64("end lsn")?;
                let commit_ts = r.i64("commit timestamp")?;
                self.commit(commit_lsn, end_lsn, commit_ts).map(Decoded::Transaction)
            }
            b'R' => {
                let relation = read_relation(&mut r, types)?;
                self.relations.insert(relation.oid, Arc::new(relation));
                Ok(Decoded::Nothing)
            }
            b'I' => {
                let relation = self.relation(r.u32("relation oid")?)?;
                expect_tag(&mut r, b'N')?;
                let new = read_tuple(&mut r, &relation)?;
                self.push(Change { relation, kind: ChangeKind::Insert, new: Some(new), old: None })
            }
            b'U' => {
                let relation = self.relation(r.u32("relation oid")?)?;
                let mut old = None;
                let mut tag = r.u8("update tuple tag")?;
                if tag == b'K' || tag == b'O' {
                    old = Some(read_tuple(&mut r, &relation)?);
                    tag = r.u8("update new tuple tag")?;
                }
                if tag != b'N' {
                    return Err(DecodeError::UnknownMessage(tag as char));
                }
                let mut new = read_tuple(&mut r, &relation)?;
                // With REPLICA IDENTITY FULL the old tuple carries the detoasted value, so an
                // unchanged TOAST column can be filled in instead of being left out.
                if let Some(old) = &old {
                    for (value, old_value) in new.values.iter_mut().zip(&old.values) {
                        if matches!(value, Value::UnchangedToast)
                            && matches!(old_value, Value::Text(_) | Value::Null)
                        {
                            *value = old_value.clone();
                        }
                    }
                }
                self.push(Change { relation, kind: ChangeKind::Update, new: Some(new), old })
            }
            b'D' => {
                let relation = self.relation(r.u32("relation oid")?)?;
                let tag = r.u8("delete tuple tag")?;
                if tag != b'K' && tag != b'O' {
                    return Err(DecodeError::UnknownMessage(tag as char));
                }
                let old = read_tuple(&mut r, &relation)?;
                self.push(Change { relation, kind: ChangeKind::Delete, new: None, old: Some(old) })
            }
            b'T' => {
                let count = r.u32("truncate relation count")?;
                let _options = r.u8("truncate options")?;
                for _ in 0..count {
                    let relation = self.relation(r.u32("truncate relation oid")?)?;
                    self.push(Change { relation, kind: ChangeKind::Truncate, new: None, old: None })?;
                }
                Ok(Decoded::Nothing)
            }
            // Origin, Type and logical decoding messages carry nothing pgcast streams; type names
            // come from the catalog, which covers user-defined types too.
            b'O' | b'Y' | b'M' => Ok(Decoded::Nothing),
            other => Err(DecodeError::UnknownMessage(other as char)),
        }
    }

    /// Starts a transaction (pgoutput Begin; the replication client reports it as an event).
    pub fn begin(&mut self) {
        self.open = Some(OpenTransaction { changes: Vec::new() });
    }

    /// Completes the open transaction (pgoutput Commit). `commit_ts` is in PostgreSQL's epoch.
    pub fn commit(
        &mut self,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_ts: i64,
    ) -> Result<Transaction, DecodeError> {
        let open = self.open.take().ok_or(DecodeError::OutsideTransaction("Commit"))?;
        Ok(Transaction {
            commit_lsn,
            end_lsn,
            commit_time_micros: commit_ts + PG_EPOCH_OFFSET_MICROS,
            changes: open.changes,
        })
    }

    fn relation(&self, oid: u32) -> Result<Arc<Relation>, DecodeError> {
        self.relations.get(&oid).cloned().ok_or(DecodeError::UnknownRelation(oid))
    }

    fn push(&mut self, change: Change) -> Result<Decoded, DecodeError> {
        let open = self.open.as_mut().ok_or(DecodeError::OutsideTransaction("row change"))?;
        open.changes.push(change);
        Ok(Decoded::Nothing)
    }
}

fn expect_tag(r: &mut Reader<'_>, want: u8) -> Result<(), DecodeError> {
    let tag = r.u8("tuple tag")?;
    if tag == want {
        Ok(())
    } else {
        Err(DecodeError::UnknownMessage(tag as char))
    }
}

fn read_relation(r: &mut Reader<'_>, types: &TypeCatalog) -> Result<Relation, DecodeError> {
    let oid = r.u32("relation oid")?;
    let schema = r.cstr("namespace")?;
    let name = r.cstr("relation name")?;
    let replica_identity = r.u8("replica identity")?;
    let count = r.i16("column count")?.max(0) as usize;
    let mut columns = Vec::with_capacity(count);
    for _ in 0..count {
        let flags = r.u8("column flags")?;
        let name = r.cstr("column name")?;
        let type_oid = r.u32("column type")?;
        let _typmod = r.i32("column typmod")?;
        let info = types.get(type_oid).ok_or(DecodeError::UnknownType(type_oid))?;
        columns.push(Column {
            name,
            type_oid,
            type_name: info.name.clone(),
            kind: info.kind.clone(),
            is_key: flags & 1 == 1,
        });
    }
    Ok(Relation { oid, schema, name, replica_identity, columns })
}

fn read_tuple(r: &mut Reader<'_>, relation: &Relation) -> Result<Row, DecodeError> {
    let count = r.i16("tuple column count")?.max(0) as usize;
    if count != relation.columns.len() {
        return Err(DecodeError::ColumnCount {
            relation: relation.oid,
            got: count,
            expected: relation.columns.len(),
        });
    }
    let mut values = Vec::with_capacity(count);
    for index in 0..count {
        let value = match r.u8("tuple value kind")? {
            b'n' => Value::Null,
            b'u' => Value::UnchangedToast,
            b't' => {
                let len = r.i32("value length")?.max(0) as usize;
                let bytes = r.bytes(len, "value")?;
                let text = std::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8)?;
                Value::Text(text.into())
            }
            b'b' => return Err(DecodeError::BinaryValue(index)),
            other => return Err(DecodeError::UnknownTupleKind(other as char)),
        };
        values.push(value);
    }
    Ok(Row { values })
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, len: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(len).ok_or(DecodeError::Truncated(what))?;
        let slice = self.buf.get(self.pos..end).ok_or(DecodeError::Truncated(what))?;
        self.pos = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let mut out = [0; N];
        out.copy_from_slice(self.bytes(N, what)?);
        Ok(out)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }
    fn i16(&mut self, what: &'static str) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.array(what)?))
    }
    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array(what)?))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }
    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array(what)?))
    }

    fn cstr(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let rest = &self.buf[self.pos..];
        let nul = rest.iter().position(|&b| b == 0).ok_or(DecodeError::Truncated(what))?;
        let s = std::str::from_utf8(&rest[..nul]).map_err(|_| DecodeError::InvalidUtf8)?;
        self.pos += nul + 1;
        Ok(s.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::value::ValueKind;

    fn relation_msg() -> Vec<u8> {
        let mut m = vec![b'R'];
        m.extend(16384u32.to_be_bytes());
        m.extend(b"public\0notes\0");
        m.push(b'd');
        m.extend(2i16.to_be_bytes());
        m.push(1);
        m.extend(b"id\0");
        m.extend(23u32.to_be_bytes());
        m.extend((-1i32).to_be_bytes());
        m.push(0);
        m.extend(b"body\0");
        m.extend(25u32.to_be_bytes());
        m.extend((-1i32).to_be_bytes());
        m
    }

    fn begin_msg() -> Vec<u8> {
        let mut m = vec![b'B'];
        m.extend(100u64.to_be_bytes());
        m.extend(0i64.to_be_bytes());
        m.extend(7u32.to_be_bytes());
        m
    }

    fn commit_msg() -> Vec<u8> {
        let mut m = vec![b'C', 0];
        m.extend(100u64.to_be_bytes());
        m.extend(108u64.to_be_bytes());
        m.extend(1_000_000i64.to_be_bytes());
        m
    }

    fn insert_msg(id: &str, body: Option<&str>) -> Vec<u8> {
        let mut m = vec![b'I'];
        m.extend(16384u32.to_be_bytes());
        m.push(b'N');
        m.extend(2i16.to_be_bytes());
        m.push(b't');
        m.extend((id.len() as i32).to_be_bytes());
        m.extend(id.as_bytes());
        match body {
            Some(b) => {
                m.push(b't');
                m.extend((b.len() as i32).to_be_bytes());
                m.extend(b.as_bytes());
            }
            None => m.push(b'n'),
        }
        m
    }

    #[test]
    fn insert_transaction_decodes_with_types_and_commit_time() {
        let types = TypeCatalog::builtin();
        let mut d = Decoder::new();
        for msg in [relation_msg(), begin_msg(), insert_msg("1", Some("hi")), insert_msg("2", None)] {
            assert!(matches!(d.decode(&msg, &types).unwrap(), Decoded::Nothing));
        }
        let Decoded::Transaction(tx) = d.decode(&commit_msg(), &types).unwrap() else {
            panic!("commit must complete the transaction")
        };
        assert_eq!((tx.commit_lsn, tx.end_lsn), (100, 108));
        assert_eq!(tx.commit_time_micros, PG_EPOCH_OFFSET_MICROS + 1_000_000);
        assert_eq!(tx.changes.len(), 2);
        let rel = &tx.changes[0].relation;
        assert_eq!((rel.schema.as_str(), rel.name.as_str()), ("public", "notes"));
        assert_eq!(rel.columns[0].kind, ValueKind::Integer);
        assert!(rel.columns[0].is_key);
        let mut json = String::new();
        tx.changes[1].new.as_ref().unwrap().write_json(rel, false, &mut json);
        assert_eq!(json, r#"{"id":2,"body":null}"#);
    }

    #[test]
    fn change_before_relation_is_an_error() {
        let types = TypeCatalog::builtin();
        let mut d = Decoder::new();
        d.decode(&begin_msg(), &types).unwrap();
        assert_eq!(
            d.decode(&insert_msg("1", None), &types).unwrap_err(),
            DecodeError::UnknownRelation(16384)
        );
    }

    #[test]
    fn every_truncation_of_valid_messages_is_an_error_not_a_panic() {
        let types = TypeCatalog::builtin();
        for msg in [relation_msg(), begin_msg(), insert_msg("12", Some("x")), commit_msg()] {
            for len in 0..msg.len() {
                let mut d = Decoder::new();
                d.decode(&relation_msg(), &types).unwrap();
                d.decode(&begin_msg(), &types).unwrap();
                assert!(d.decode(&msg[..len], &types).is_err(), "prefix {len} of {:?}", msg[0]);
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A small deterministic fuzz: xorshift-generated messages with valid leading tags.
        let types = TypeCatalog::builtin();
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let tags = b"BCRIUDTOYMxK";
        for _ in 0..20_000 {
            let len = (next() % 64) as usize;
            let mut msg: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if let Some(first) = msg.first_mut() {
                *first = tags[(next() % tags.len() as u64) as usize];
            }
            let mut d = Decoder::new();
            let _ = d.decode(&relation_msg(), &types);
            let _ = d.decode(&begin_msg(), &types);
            let _ = d.decode(&msg, &types);
        }
    }
}
