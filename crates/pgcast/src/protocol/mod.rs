//! Wire formats spoken to clients. Only framing lives here: no decisions about who receives what.

pub mod phoenix;
